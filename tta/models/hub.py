"""Hub downloads, and what happens without a network.

Model files that are not on this machine are downloaded by the library that defines the model (torchvision, timm,
open_clip, segmentation_models_pytorch, diffusers through huggingface_hub). Offline, those libraries retry for about
a minute and then fail with their own traceback ("does not appear to have a file named config.json", a urlopen
error). So before a download the model sources call `require_host`: one connection attempt of at most
PROBE_TIMEOUT_S to the host that serves the files (through the HTTPS proxy when one is set), which raises
HubUnreachable, one line naming the missing network and the offline alternatives, when it fails or when the user
switched downloads off (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE). Files already here (torch's hub cache, the Hugging
Face cache, a local folder) are used without a probe. `download_errors` turns a connection error that still happens
during a download (the network dropped, a firewall that lets the probe through) into the same named error.
"""
from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Tuple

from .weights import find_offline_weights, torch_hub_checkpoints

PROBE_TIMEOUT_S = 3.0
HF_HOST = "huggingface.co"
OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
OFFLINE_ALTERNATIVES = ("to run offline, pass a local checkpoint (tta run --weights PATH, weights: in a benchmark "
                        "file, weights= in Python) or a local folder, or use a zoo: model (tta zoo list)")
FROM_THE_CACHE = "; or copy the model's files into the hub cache on a machine with a network and set HF_HUB_OFFLINE=1"
# Errors of the download libraries (urllib, requests, httpx, huggingface_hub) that mean "could not connect", by
# name, so that none of those optional libraries has to be imported to recognise them. HTTPError (a 404, a 401) is
# deliberately absent: the network worked, the file or the permission is what is missing.
CONNECTION_ERRORS = frozenset({"URLError", "ConnectionError", "ConnectError", "ConnectTimeout", "ConnectTimeoutError",
                               "NewConnectionError", "MaxRetryError", "ReadTimeout", "LocalEntryNotFoundError",
                               "OfflineModeIsEnabled"})


class HubUnreachable(ConnectionError):
    """A model's files are not on this machine and cannot be downloaded: no network, or downloads switched off."""


def offline_switch() -> Optional[str]:
    """The variable by which the user switched hub downloads off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to a
    true value, as huggingface_hub reads them), or None."""
    return next((name for name in OFFLINE_ENV
                 if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")), None)


def probe_target(host: str, port: int = 443) -> Tuple[str, int]:
    """Where a connection to `host` goes: the HTTPS proxy (HTTPS_PROXY, ALL_PROXY) unless NO_PROXY exempts host."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get("https") or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if parts.hostname:
            return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    return host, port


def connection_failure(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """None when a TCP connection to host (or to the proxy that carries it) opens within `timeout` seconds, else
    why it did not."""
    target = probe_target(host, port)
    try:
        socket.create_connection(target, timeout=timeout).close()
        return None
    except socket.timeout:
        reason = f"no answer within {timeout:g} s"
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
    via = f" through the proxy {target[0]}:{target[1]}" if target[0] != host else ""
    return f"cannot connect to {host}{via}: {reason}"


def require_host(url_or_host: str, what: str, cache_hint: str = FROM_THE_CACHE) -> None:
    """Called right before `what` is downloaded from `url_or_host`: raise HubUnreachable, without waiting for a
    library's retries, when downloads are switched off or the host does not answer. `cache_hint` ends the message
    of the second case: how to put the files where the library finds them without a network."""
    url = urllib.parse.urlsplit(url_or_host if "://" in url_or_host else f"https://{url_or_host}")
    host, port = url.hostname or url_or_host, url.port or (80 if url.scheme == "http" else 443)
    switch = offline_switch()
    if switch:
        raise HubUnreachable(f"cannot load {what}: its files are not on this machine and downloads are switched off "
                             f"({switch} is set); {OFFLINE_ALTERNATIVES}; or unset {switch} on a machine with a "
                             "network to download them")
    failure = connection_failure(host, port)
    if failure:
        raise HubUnreachable(f"cannot download {what}: no network ({failure}); {OFFLINE_ALTERNATIVES}{cache_hint}")


def is_connection_error(err: BaseException) -> bool:
    """Whether err, or an error it was raised from, is a failure to connect: the socket's own errors, or those of
    the download libraries (CONNECTION_ERRORS)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (ConnectionError, socket.gaierror, TimeoutError)) or type(err).__name__ in CONNECTION_ERRORS:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def download_errors(what: str) -> Iterator[None]:
    """Re-raise a connection error of the download libraries inside the block as HubUnreachable naming `what`."""
    try:
        yield
    except HubUnreachable:
        raise
    except Exception as err:
        if not is_connection_error(err):
            raise
        cause = " ".join(str(err).split())[:200]
        raise HubUnreachable(f"cannot download {what}: the network failed ({type(err).__name__}: {cause}); "
                             f"{OFFLINE_ALTERNATIVES}{'' if offline_switch() else FROM_THE_CACHE}") from err


def hf_cached(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds files of this model repository (huggingface_hub then uses them when the
    hub does not answer, after one failed request instead of a minute of retries)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.strip('/').replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(p.is_dir() and any(p.iterdir()) for p in snapshots.iterdir())


def hf_endpoint() -> str:
    """The hub huggingface_hub downloads from: HF_ENDPOINT (a mirror) when set, else huggingface.co."""
    try:
        from huggingface_hub import constants
        return constants.ENDPOINT or HF_HOST
    except ImportError:
        return HF_HOST


def require_hf_repo(repo_id: str, what: str) -> None:
    """Before a download from the Hugging Face hub: nothing when the repository is cached, else require_host."""
    if not hf_cached(repo_id):
        require_host(hf_endpoint(), what if repo_id in what else f"{what} (hub repository {repo_id})")


def url_file_name(url: str) -> str:
    return urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]


def url_file_cached(url: str) -> Optional[Path]:
    """The copy of a URL's file in torch's hub cache (where torch.hub, torchvision and timm keep downloads)."""
    return find_offline_weights(url_file_name(url))


def require_url(url: str, what: str) -> None:
    """Before a download from a URL: nothing when torch's hub cache holds the file, else require_host."""
    if url_file_cached(url) is None:
        require_host(url, what, f"; or copy {url_file_name(url)} into {torch_hub_checkpoints()} from a machine with a "
                                "network")

"""The README's Quick start runs as written, offline, in a fresh interpreter."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_code() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the Quick start has no python block"
    return blocks[0]


@pytest.mark.slow  # the README's quick start in a fresh interpreter
def test_quick_start_runs_as_written(tmp_path):
    env = {"PATH": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", quick_start_code()], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"TENT accuracy on 64 noisy images: \d+\.\d%", done.stdout)


# Examples of the "Command line" section that need what no test machine has: the network (hub weights), a user's
# own images or data set, or result files the reader names. Every other example is run as written.
NEEDS_THE_READER = ("path/to/images", "/data/ImageNet-C", "a.jsonl b.jsonl")


def command_line_examples():
    text = (ROOT / "README.md").read_text()
    block = re.findall(r"```bash\n(.*?)```", text.split("## Command line", 1)[1], flags=re.S)[0]
    joined = block.replace("\\\n", " ")
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
    return [c for c in commands if c]


@pytest.mark.slow  # every README command in its own interpreter
def test_command_line_examples_run_as_written(tmp_path):
    import shlex
    import shutil
    examples = command_line_examples()
    skipped = [c for c in examples if any(m in c for m in NEEDS_THE_READER)]
    assert len(skipped) == len(NEEDS_THE_READER)  # a new example that cannot run here must be listed above
    (tmp_path / "results").mkdir()
    shutil.copy(ROOT / "results" / "quick.jsonl", tmp_path / "results")  # `tta report` writes next to it, here
    tta = Path(sys.executable).with_name("tta")
    for command in examples:
        if command in skipped:
            continue
        argv = shlex.split(command)
        assert argv[0] == "tta"
        done = subprocess.run([str(tta), *argv[1:], *(["--threads", "1"] if argv[1] in ("run", "bench") else [])],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={"PATH": "", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                   "TORCH_HOME": str(Path.home() / ".cache" / "torch")})
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"

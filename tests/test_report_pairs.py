"""`tta report --pair A B`: any two labels compared image by image, even across models."""
from pathlib import Path

import pytest

from tta.bench.report import write_report

EVIDENCE = Path(__file__).resolve().parents[1] / "results" / "evidence.jsonl"


def test_pair_within_a_group_equals_the_groups_own_outcome_line(tmp_path):
    made = write_report([EVIDENCE], out=str(tmp_path / "r"), plots=False,
                        pairs=[("diffusion_classifier-judge16", "source"), ("source-it3-model", "source")])
    md = made["markdown"][0].read_text()
    head, asked = md.split("## Paired comparisons asked for")
    dc_lines = [line for line in md.splitlines() if line.startswith("- **diffusion_classifier-judge16**")]
    assert len(dc_lines) == 2 and dc_lines[0] == dc_lines[1]  # the group's line and the asked one agree
    # across models: the IT3 network's source rows against the CNN's, on the same 1800 images
    assert "- **source-it3-model** accuracy against source: on corrupted domains (8 domains, 1600 images)" in asked


def test_unknown_pair_label_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="no rows labelled 'nope'.*labels in these results: .*memo"):
        write_report([EVIDENCE], out=str(tmp_path / "r"), plots=False, pairs=[("memo", "nope")])
    assert not list(tmp_path.iterdir())

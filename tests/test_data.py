"""Text sources and windows: seeded, disjoint, validated."""

import json

import pytest
import torch

from conftest import PROSE
from ghostlayers.data import calibration_windows, eval_windows, load_documents
from ghostlayers.errors import GhostlayersError


@pytest.fixture
def prose_file(tmp_path):
    path = tmp_path / "prose.txt"
    path.write_text(PROSE * 20)
    return path


def test_calibration_windows_are_seeded_and_distinct(tokenizer, prose_file):
    a = calibration_windows(tokenizer, str(prose_file), 8, 32, seed=0)
    b = calibration_windows(tokenizer, str(prose_file), 8, 32, seed=0)
    c = calibration_windows(tokenizer, str(prose_file), 8, 32, seed=1)
    assert a.shape == (8, 32) and torch.equal(a, b) and not torch.equal(a, c)
    stream = tokenizer(PROSE * 20 + "\n\n", add_special_tokens=False).input_ids
    starts = []
    for row in a.tolist():  # each window is an aligned, non-overlapping slice of the stream
        start = next(s for s in range(0, len(stream), 32) if stream[s : s + 32] == row)
        starts.append(start)
    assert len(set(starts)) == 8


def test_eval_windows_are_consecutive(tokenizer, prose_file):
    w = eval_windows(tokenizer, str(prose_file), 64, max_windows=3)
    stream = tokenizer(PROSE * 20 + "\n\n", add_special_tokens=False).input_ids
    assert w.flatten().tolist() == stream[: 3 * 64]


def test_text_too_short(tokenizer, prose_file):
    with pytest.raises(GhostlayersError, match="too short"):
        calibration_windows(tokenizer, str(prose_file), 1000, 64)
    with pytest.raises(GhostlayersError, match="fewer than one window"):
        eval_windows(tokenizer, str(prose_file), 100_000)


def test_bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(GhostlayersError, match="no text"):
        load_documents(str(tmp_path / "empty.txt"), "calib")
    with pytest.raises(GhostlayersError, match="binary"):
        load_documents(str(tmp_path / "bin.txt"), "calib")
    with pytest.raises(GhostlayersError, match="bad.jsonl:2"):
        load_documents(str(tmp_path / "bad.jsonl"), "calib")
    with pytest.raises(GhostlayersError, match="unknown text source"):
        load_documents(str(tmp_path / "missing.txt"), "calib")


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]) + "\n")
    assert load_documents(str(path), "eval") == ["one", "two"]


def test_hub_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GhostlayersError, match="offline"):
        load_documents("wikitext2", "calib")


@pytest.mark.parametrize("source", ["wiki", "news"])
def test_named_sources_split_by_article(source):
    calib, held = load_documents(source, "calib"), load_documents(source, "eval")
    assert len(held) >= 20 and len(calib) >= 4 * len(held) - 4
    assert not set(calib) & set(held)
    if source == "wiki":
        text = "\n".join(calib)
        assert "Autism" in text and "Anarchism" in "\n".join(held) and "[[" not in text and "'''" not in text

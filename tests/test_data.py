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


class _FakeDataset(dict):
    """What `datasets.load_dataset` returns, as far as the hub protocols read it: columns, and row slices."""

    def __getitem__(self, key):
        if isinstance(key, slice):
            return {name: column[key] for name, column in self.items()}
        return dict.__getitem__(self, key)


def test_hub_protocols_follow_the_reference_evaluation_code(monkeypatch, tokenizer):
    """Defect 7 of issue 13: WikiText-2 is joined with blank lines, PTB is scored on its validation split, C4
    evaluates the first 1100 validation documents joined by spaces (at most 256 windows) and calibrates on one random
    window inside one random document per sample."""
    import datasets

    import ghostlayers.data as data

    calls = []
    docs = [f"document {i} " + "word " * (2 + i % 9) for i in range(1200)]  # 19 to 60 bytes: some too short

    def fake(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        if path == "wikitext":
            return _FakeDataset(text=[" = Title = \n", " first line \n", "", " second line \n"])
        if path == "ptb_text_only":
            return _FakeDataset(sentence=[f"{split} sentence {i}" for i in range(3)])
        return _FakeDataset(text=docs)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(data, "hub_offline", lambda: False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert load_documents("wikitext2", "eval") == [" = Title = \n\n\n first line \n\n\n\n\n second line \n"]
    assert calls[-1][2] == "test"
    assert load_documents("ptb", "eval") == ["validation sentence 0 validation sentence 1 validation sentence 2"]
    assert calls[-1][:3] == ("ptb_text_only", "penn_treebank", "validation")
    assert load_documents("c4", "eval") == [" ".join(docs[:1100])]
    held = eval_windows(tokenizer, "c4", 16)
    assert len(held) == 256  # the reference scores 256 windows of C4
    stream = data.token_stream(tokenizer, [" ".join(docs[:1100])])
    assert torch.equal(held.flatten(), stream[: 256 * 16])
    windows = calibration_windows(tokenizer, "c4", 12, 32, seed=3)
    assert windows.shape == (12, 32)
    for w in windows.tolist():  # each window lies inside one document (the test tokenizer is byte-level)
        assert any(tokenizer.decode(w) in d for d in docs)
    assert torch.equal(windows, calibration_windows(tokenizer, "c4", 12, 32, seed=3))  # seeded


def test_mixture_takes_an_equal_interleaved_share_of_each_source(tokenizer, tmp_path):
    """`--calib a,b`: each source's windows are exactly what calibrating on it alone draws with the same seed,
    interleaved a, b, a, … (the first source one more when the count is odd); evaluation scores each in turn."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(PROSE * 20)
    b.write_text("Entirely different words about ships, harbours and the weather at sea. " * 120)
    mixed = calibration_windows(tokenizer, f"{a},{b}", 7, 32, seed=3)
    alone_a = calibration_windows(tokenizer, str(a), 4, 32, seed=3)
    alone_b = calibration_windows(tokenizer, str(b), 3, 32, seed=3)
    assert torch.equal(mixed[0::2], alone_a) and torch.equal(mixed[1::2], alone_b)
    assert torch.equal(eval_windows(tokenizer, f"{a},{b}", 32, max_windows=4),
                       torch.cat([eval_windows(tokenizer, str(a), 32, 2), eval_windows(tokenizer, str(b), 32, 2)]))
    assert load_documents(f"{a},{b}", "calib") == load_documents(str(a), "calib") + load_documents(str(b), "calib")
    for bad in (f"{a},{a}", f"{a},", "wiki,nope"):
        with pytest.raises(GhostlayersError, match="distinct sources|unknown text source"):
            calibration_windows(tokenizer, bad, 4, 32)
    with pytest.raises(GhostlayersError, match="at least 2 --calib-samples"):
        calibration_windows(tokenizer, f"{a},{b}", 1, 32)


def _page(title: str, body: str) -> str:
    return (f'<?xml version="1.0"?><html><head><title>{title}</title><style>p {{}}</style></head><body>'
            '<div id="banner"><a href="x"><span>Download the ebook</span></a></div>'
            '<ul class="docnav top"><li class="previous"><a href="p.html"><strong>Prev</strong></a></li></ul>'
            f'<div class="section"><h2 class="title">{title}</h2><div class="para">\n\t\t{body}\n\t</div>'
            '<pre class="screen"><code>$ apt-get   install  foo</code></pre></div>'
            '<ul class="docnav"><li><a href="n.html"><strong>Next</strong></a></li></ul></body></html>')


def test_handbook_sections_are_the_pages_prose_split_by_section(monkeypatch, tmp_path):
    from ghostlayers import data

    monkeypatch.setattr(data, "HANDBOOK", tmp_path / "missing")
    data._handbook_sections.cache_clear()
    with pytest.raises(GhostlayersError, match="apt install debian-handbook"):
        load_documents("handbook", "calib")
    for k in range(10):
        (tmp_path / f"sect.{k}.html").write_text(_page(f"{k}.1. Section {k}", f"Section {k} says " + "words " * 120))
    (tmp_path / "short.html").write_text(_page("Legal", "tiny"))  # too short to be a section: left out
    monkeypatch.setattr(data, "HANDBOOK", tmp_path)
    data._handbook_sections.cache_clear()
    try:
        calib, held = load_documents("handbook", "calib"), load_documents("handbook", "eval")
    finally:
        data._handbook_sections.cache_clear()
    assert len(calib) == 8 and len(held) == 2 and not set(calib) & set(held)
    first = held[0].splitlines()
    assert first[0] == "0.1. Section 0" and first[1].startswith("Section 0 says words words")
    assert first[2] == "$ apt-get install foo"  # listings kept, whitespace collapsed
    for text in calib + held:
        assert "Prev" not in text and "Next" not in text and "Download" not in text and "{" not in text

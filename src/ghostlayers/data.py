"""Text sources -> token windows.

A source is a file (.txt, or .jsonl with a "text" field), a named offline source that ships with a PyPI package
(`wiki`, `news`) or a Debian one (`handbook`), or a hub dataset (`wikitext2`, `c4`, `ptb`) for users who are online. Named sources have a
calibration part and a held-out part split by article, so evaluating on `--text wiki` never sees text calibrated on
with `--calib wiki`. A file is used whole for both: keep calibration and evaluation files apart yourself.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Literal

from typing import TYPE_CHECKING

from .errors import GhostlayersError

if TYPE_CHECKING:  # torch is imported when windows are made, not to name a source (the CLI checks --calib first)
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

Split = Literal["calib", "eval"]
OFFLINE_SOURCES = {
    "wiki": "English Wikipedia excerpt (gensim test data, markup removed); every 5th article held out",
    "news": "Lee corpus of 300 Australian news articles (gensim test data); every 5th article held out",
    "handbook": "The Debian Administrator's Handbook, English, one document per section (technical documentation; "
                "apt install debian-handbook); every 5th section held out",
}
HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")  # where the Debian package puts its HTML
# The hub sources follow the protocol of the pruning literature's evaluation code (SparseGPT's `get_loaders`, which
# Wanda, LLM-Streamline and the Ghosted Layers code reuse), so that --text numbers compare with published tables.
HUB_SOURCES = {
    "wikitext2": "WikiText-2 raw, lines joined with blank lines (train for calibration, test for evaluation)",
    "c4": "C4 English (calibration: a random window inside a random document of the first train shard, one per "
          "window; evaluation: the first 1100 validation documents joined by spaces, at most 256 windows)",
    "ptb": "Penn Treebank, sentences joined by spaces (train for calibration, validation for evaluation)",
}
C4_EVAL_DOCUMENTS = 1100  # the reference protocol's validation text ...
C4_EVAL_WINDOWS = 256  # ... and how many windows of it are scored
HELD_OUT_EVERY = 5


def hub_offline() -> bool:
    """Whether the environment says the Hugging Face hub must not be reached."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def mixture(source: str) -> list[str]:
    """The sources of a comma-separated mixture ("wiki,news"), or [source] for one; refused when empty or repeated."""
    parts = [p.strip() for p in source.split(",")] if "," in source and not Path(source).expanduser().exists() else [source]
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise GhostlayersError(f"text mixture {source!r} must name distinct sources separated by commas, e.g. wiki,news")
    return parts


def load_documents(source: str, split: Split) -> list[str]:
    """The documents of `source` for calibration or evaluation (of every source of a mixture, in order)."""
    parts = mixture(source)
    if len(parts) > 1:
        return [doc for part in parts for doc in load_documents(part, split)]
    if source in OFFLINE_SOURCES:
        docs = {"wiki": _wiki_articles, "news": _news_articles, "handbook": _handbook_sections}[source]()
        return _split(docs, split)
    if source in HUB_SOURCES:
        return _hub_documents(source, split)
    path = Path(source).expanduser()
    if path.is_file():
        return _file_documents(path)
    if path.exists():
        raise GhostlayersError(f"{source} is not a file: pass a .txt or .jsonl file")
    raise GhostlayersError(
        f"unknown text source {source!r}: pass a .txt/.jsonl file or one of "
        f"{', '.join([*OFFLINE_SOURCES, *HUB_SOURCES])}"
    )


def _split(docs: list[str], split: Split) -> list[str]:
    docs = list(dict.fromkeys(docs))  # the Lee corpus repeats a few articles: never in both parts
    held = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == 0]
    return held if split == "eval" else [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != 0]


def _file_documents(path: Path) -> list[str]:
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise GhostlayersError(f"{path} looks binary: pass a UTF-8 .txt or .jsonl file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GhostlayersError(f"{path} is not UTF-8 text: convert it or pass another file") from None
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                docs.append(str(record["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise GhostlayersError(f"{path}:{number} is not a JSON object with a \"text\" field") from None
    else:
        docs = [text]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise GhostlayersError(f"{path} has no text: pass a file with some prose in it")
    return docs


def _gensim_data(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise GhostlayersError("the wiki and news sources need gensim's test data: pip install gensim (or make demo)")
    return Path(spec.origin).parent / "test" / "test_data" / name


_MARKUP = [
    (re.compile(r"'{2,}"), ""),  # bold / italics quotes
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),  # headings keep their words
    (re.compile(r"^\s*[*#:;]+\s*", re.M), ""),  # list markers
    (re.compile(r"^(File|Image):.*$|^.*\|.*$", re.M), ""),  # image captions and table rows
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n\s*\n\s*(\n\s*)+"), "\n\n"),
]


@functools.lru_cache(maxsize=1)
def _wiki_articles() -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = _gensim_data("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    articles = []
    with bz2.open(path, "rb") as f:
        for title, text, _ in extract_pages(f):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            clean = filter_wiki(text)
            for pattern, repl in _MARKUP:
                clean = pattern.sub(repl, clean)
            clean = clean.strip()
            if len(clean) > 500:
                articles.append(f"{title}\n\n{clean}")
    return articles


@functools.lru_cache(maxsize=1)
def _news_articles() -> list[str]:
    lines = _gensim_data("lee_background.cor").read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


class _Prose(HTMLParser):
    """The text of a handbook page: its paragraphs, headings, list items and listings, one block per paragraph,
    without the navigation around them."""

    BLOCKS = {"div", "p", "h1", "h2", "h3", "h4", "h5", "li", "pre", "dt", "dd", "tr", "td", "br"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skip: list[str] = []  # the open tags whose content is left out (and everything inside them)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if self.skip or tag in ("head", "script", "style") or "docnav" in (found.get("class") or "") \
                or found.get("id") in ("banner", "title"):
            self.skip.append(tag)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.pop()
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        lines = (" ".join(line.split()) for line in "".join(self.parts).splitlines())
        return "\n".join(line for line in lines if line)


@functools.lru_cache(maxsize=1)
def _handbook_sections() -> list[str]:
    pages = sorted(HANDBOOK.glob("*.html")) if HANDBOOK.is_dir() else []
    if not pages:
        raise GhostlayersError(f"the handbook source needs the Debian package debian-handbook ({HANDBOOK} is "
                               "missing): apt install debian-handbook")
    sections = []
    for page in pages:
        parser = _Prose()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        if len(text := parser.text()) > 500:
            sections.append(text)
    return sections


def _hub_documents(name: str, split: Split) -> list[str]:
    if hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise GhostlayersError(
            f"text source {name!r} is downloaded from the Hugging Face hub, which is offline here "
            f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): use wiki, news or a local file"
        )
    try:
        from datasets import load_dataset
    except ImportError:
        raise GhostlayersError(f"text source {name!r} needs the datasets package: pip install 'ghostlayers[hub]'") from None
    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "calib" else "test")
            return ["\n\n".join(ds["text"])]
        if name == "ptb":
            ds = load_dataset("ptb_text_only", "penn_treebank", split="train" if split == "calib" else "validation")
            return [" ".join(ds["sentence"])]
        files = {
            "calib": "en/c4-train.00000-of-01024.json.gz",
            "eval": "en/c4-validation.00000-of-00008.json.gz",
        }
        ds = load_dataset("allenai/c4", data_files={"x": files[split]}, split="x")
        if split == "eval":
            return [" ".join(ds[:C4_EVAL_DOCUMENTS]["text"])]
        return list(ds["text"][:20000])  # documents: calibration draws a window inside one of them
    except Exception as err:  # network and hub errors come in many types; report the first line
        raise GhostlayersError(f"cannot load text source {name!r} from the hub: {str(err).splitlines()[0]}") from err


def token_stream(tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> Tensor:
    """All documents as one 1-D token stream, separated by a blank line."""
    import torch

    encoded = tokenizer([d + "\n\n" for d in docs], add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([t for ids in encoded for t in ids], dtype=torch.long)


def document_windows(tokenizer: PreTrainedTokenizerBase, docs: list[str], samples: int, seq_len: int,
                     seed: int = 0) -> Tensor:
    """C4's calibration protocol: each window is `seq_len` tokens at a random place inside one random document
    longer than that (documents drawn with replacement, as the reference code does): (N, T)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    tried = 0
    while len(out) < samples:
        tried += 1
        if tried > 100 * samples + 1000:
            raise GhostlayersError(f"too few documents longer than {seq_len} tokens for {samples} calibration "
                                   "windows: use a shorter --seq-len or fewer --calib-samples")
        doc = docs[int(torch.randint(len(docs), (1,), generator=generator))]
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) <= seq_len:
            continue
        start = int(torch.randint(len(ids) - seq_len, (1,), generator=generator))
        out.append(torch.tensor(ids[start : start + seq_len], dtype=torch.long))
    return torch.stack(out)


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase, source: str, samples: int, seq_len: int, seed: int = 0
) -> Tensor:
    """`samples` distinct non-overlapping windows of `seq_len` tokens, drawn from the source with `seed`: (N, T).

    A mixture ("wiki,news") takes an equal share from each source (the first ones one more when it does not divide),
    each drawn with `seed`, interleaved (wiki, news, wiki, …) so that every fold and every tail holds both."""
    if samples < 1 or seq_len < 2:
        raise GhostlayersError("--calib-samples must be at least 1 and --seq-len at least 2")
    parts = mixture(source)
    if len(parts) > 1:
        import torch

        if samples < len(parts):
            raise GhostlayersError(f"a mixture of {len(parts)} sources needs at least {len(parts)} --calib-samples")
        shares = [samples // len(parts) + (i < samples % len(parts)) for i in range(len(parts))]
        drawn = [calibration_windows(tokenizer, p, k, seq_len, seed) for p, k in zip(parts, shares)]
        order = sorted(((j, i) for i, k in enumerate(shares) for j in range(k)))  # round-robin over the sources
        return torch.stack([drawn[i][j] for j, i in order])
    if source == "c4":
        return document_windows(tokenizer, load_documents(source, "calib"), samples, seq_len, seed)
    stream = token_stream(tokenizer, load_documents(source, "calib"))
    available = len(stream) // seq_len
    if available < samples:
        raise GhostlayersError(
            f"calibration text {source!r} is too short: {len(stream)} tokens make {available} windows of {seq_len}, "
            f"{samples} asked for; use a longer text, fewer --calib-samples or a shorter --seq-len"
        )
    import torch

    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:samples]
    return stream[: available * seq_len].view(available, seq_len)[chosen]


def eval_windows(
    tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int, max_windows: int | None = None
) -> Tensor:
    """Consecutive non-overlapping windows of the held-out part, in order: (N, T). A mixture scores each source's
    windows in turn (`max_windows` shared equally)."""
    if seq_len < 2:
        raise GhostlayersError("--seq-len must be at least 2")
    parts = mixture(source)
    if len(parts) > 1:
        import torch

        share = None if max_windows is None else max(1, max_windows // len(parts))
        return torch.cat([eval_windows(tokenizer, p, seq_len, share) for p in parts])
    stream = token_stream(tokenizer, load_documents(source, "eval"))
    available = len(stream) // seq_len
    if available < 1:
        raise GhostlayersError(
            f"evaluation text {source!r} has {len(stream)} tokens, fewer than one window of {seq_len}: "
            "use a longer text or a shorter --seq-len"
        )
    cap = C4_EVAL_WINDOWS if source == "c4" else available
    count = min(available, cap) if max_windows is None else min(available, cap, max_windows)
    return stream[: count * seq_len].view(count, seq_len)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_FACT = re.compile(r"^(?P<prompt>[A-Z][^\n()\[\];:\"]{20,200}?)\s(?P<answer>[A-Z][a-z]{2,}|1[0-9]{3}|20[0-9]{2})\.$")


def factual_prompts(source: str, count: int, per_document: int = 2) -> list[tuple[str, str]]:
    """Short factual cloze prompts from the held-out part of `source`: sentences that end in a name or a year
    ("Rand moved to the United States in" → "1926"), cut before that last word, which is the answer. At most
    `per_document` from each document, in order, the answer not already in the prompt; offline and deterministic."""
    found: list[tuple[str, str]] = []
    for doc in load_documents(source, "eval"):
        taken = 0
        for sentence in _SENTENCE_END.split(doc):
            match = _FACT.match(sentence.strip())
            if match is None or match["answer"] in match["prompt"] or not 6 <= len(match["prompt"].split()) <= 24:
                continue
            found.append((match["prompt"], match["answer"]))
            taken += 1
            if len(found) == count:
                return found
            if taken == per_document:
                break
    return found

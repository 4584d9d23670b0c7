"""Category sets: synsets files, timm's ImageNet lists, a WebVision-2.0-style selection, class text.

A synsets file has one class per line, `wnid` then optional text (WebVision's `info/synsets.txt`:
`n01440764 tench, Tinca tinca`; timm's `imagenet_synsets.txt`: the wnid alone), separated by spaces
or tabs. Line order is the class index, so duplicate ids are an error rather than silently dropped
(dropping one would shift every later class index). Blank lines and a UTF-8 byte-order mark are
skipped. `read_synsets` is the one reader: the data set (`megaclass.data`), the semantics and the
weighting all read class lists through it.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Iterable, Sequence

from megaclass.io import atomic_write_text
from megaclass.semantics.wordnet import hypernyms, synset_of, wnid_of, wordnet

WNID = re.compile(r"^[nvasr]\d{8}$")


class SynsetsError(ValueError):
    """A synsets file or wnid list is malformed, has duplicates, or names synsets WordNet lacks."""


def read_synsets(path: str | Path, check_wordnet: bool = True) -> list[tuple[str, str]]:
    """Read a synsets file -> `[(wnid, text), ...]` in file order (text is "" when absent).

    Raises SynsetsError naming the file and line of every malformed or duplicate id, and (with
    `check_wordnet`) one error listing every id that is not a WordNet 3.0 noun synset.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SynsetsError(f"cannot read synsets file {path}: {exc}") from exc
    entries: list[tuple[str, str]] = []
    line_of: dict[str, int] = {}
    problems = []
    for number, data in enumerate(raw.splitlines(), 1):
        try:
            line = data.decode("utf-8").lstrip("\ufeff")  # a BOM: at the start, or where files were joined
        except UnicodeDecodeError as exc:
            problems.append(f"{path}:{number}: not UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        fields = line.strip().split(maxsplit=1)
        if not fields:
            continue
        wnid, text = fields[0], (fields[1].strip() if len(fields) > 1 else "")
        if not WNID.match(wnid):
            problems.append(f"{path}:{number}: {wnid!r} is not a wnid (a letter n/v/a/s/r and 8 digits)")
        elif wnid in line_of:
            problems.append(f"{path}:{number}: duplicate wnid {wnid} (first on line {line_of[wnid]})")
        else:
            line_of[wnid] = number
            entries.append((wnid, text))
    if problems:
        raise SynsetsError(f"{len(problems)} bad line(s) in {path}:\n  " + "\n  ".join(problems))
    if not entries:
        raise SynsetsError(f"{path} lists no synsets")
    if check_wordnet:
        check_noun_synsets([w for w, _ in entries], where={w: f"{path}:{n}" for w, n in line_of.items()})
    return entries


def check_noun_synsets(wnids: Sequence[str], where: dict[str, str] | None = None) -> None:
    """Raise ONE SynsetsError listing every wnid that is not a WordNet 3.0 noun synset."""
    unknown = []
    for wnid in wnids:
        try:
            ok = wnid[0] == "n" and synset_of(wnid).pos() == "n"
        except KeyError:
            ok = False
        if not ok:
            unknown.append(f"{where[wnid]}: {wnid}" if where and wnid in where else wnid)
    if unknown:
        raise SynsetsError(
            f"{len(unknown)} wnid(s) are not WordNet 3.0 noun synsets:\n  " + "\n  ".join(unknown))


def timm_info_dir() -> Path:
    """timm's `data/_info` folder, which ships the ImageNet synset lists."""
    import timm

    return Path(timm.__file__).parent / "data" / "_info"


def imagenet1k_wnids() -> list[str]:
    """The 1,000 ILSVRC-2012 classes (also WebVision 1.0's), in timm's (= class index) order; the
    one loader of that list (the synthetic data set draws its categories from it too)."""
    return [w for w, _ in read_synsets(timm_info_dir() / "imagenet_synsets.txt", check_wordnet=False)]


def imagenet22k_wnids() -> list[str]:
    """All 21,841 ImageNet-22k (fall 2011) synsets, in timm's order."""
    return [w for w, _ in read_synsets(timm_info_dir() / "imagenet22k_synsets.txt", check_wordnet=False)]


def ancestors(synset) -> set:
    """Every hypernym (class and instance links) of `synset` up to the root, excluding itself."""
    return set(synset.closure(lambda s: hypernyms(s, instances=True)))


def select_webvision2(total: int = 5000, seed: int = 0) -> list[str]:
    """A deterministic WebVision-2.0-style class set: the 1,000 ILSVRC classes, then `total - 1000`
    more from ImageNet-22k, none an ancestor or descendant of a class already chosen.

    Candidates are taken leaves-of-22k first (the most specific, most visual synsets), each group in a
    pseudo-random order fixed by SHA-1 of `seed:wnid`, so the picks spread over the whole hierarchy
    instead of bunching at low WordNet offsets. The extra classes follow the 1,000 sorted by wnid.
    """
    base = imagenet1k_wnids()
    pool = imagenet22k_wnids()
    if not len(base) <= total <= len(pool):
        raise ValueError(f"total must be in [{len(base)}, {len(pool)}], got {total}")
    synsets = {w: synset_of(w) for w in dict.fromkeys(base + pool)}
    anc = {w: {wnid_of(a) for a in ancestors(s)} for w, s in synsets.items()}
    internal = set().union(*(anc[w] for w in pool))  # a 22k synset with a 22k descendant

    chosen = set(base)
    blocked = set(base).union(*(anc[w] for w in base))  # chosen classes and their ancestors

    def order(w: str) -> tuple[bool, str]:
        return w in internal, hashlib.sha1(f"{seed}:{w}".encode()).hexdigest()

    extra = []
    for wnid in sorted((w for w in pool if w not in chosen), key=order):
        if len(extra) == total - len(base):
            break
        if wnid in blocked or anc[wnid] & chosen:
            continue
        extra.append(wnid)
        chosen.add(wnid)
        blocked.add(wnid)
        blocked |= anc[wnid]
    if len(extra) < total - len(base):
        raise ValueError(f"only {len(base) + len(extra)} unrelated classes available, asked for {total}")
    return base + sorted(extra)


def lemma_names(synset) -> list[str]:
    return [name.replace("_", " ") for name in synset.lemma_names()]


def class_texts(wnids: Sequence[str], names: Iterable[str] | None = None) -> list[str]:
    """One sentence per class for the text encoder: `"<names>: <gloss>; a kind of <hypernyms>"`.

    names: optional per-class names (e.g. the synsets file's text); where empty, WordNet's lemmas.
    E.g. n02123045 -> "tabby, tabby cat: a cat with a grey or tawny coat mottled with black; a kind of
    domestic cat, house cat, Felis domesticus, Felis catus".
    """
    names = list(names) if names is not None else [""] * len(wnids)
    if len(names) != len(wnids):
        raise ValueError(f"{len(names)} names for {len(wnids)} wnids")
    wordnet()
    texts = []
    for wnid, name in zip(wnids, names):
        synset = synset_of(wnid)
        text = f"{name.strip() or ', '.join(lemma_names(synset))}: {synset.definition()}"
        # NLTK returns hypernyms in set order, which changes between processes: sort for stable text.
        kinds = [", ".join(lemma_names(h)) for h in sorted(hypernyms(synset, instances=True), key=lambda h: h.name())]
        if kinds:
            text += "; a kind of " + "; ".join(kinds)
        texts.append(text)
    return texts


def write_synsets(path: str | Path, wnids: Sequence[str]) -> None:
    """Write a WebVision-format synsets file (`wnid lemma, lemma, ...`), atomically."""
    atomic_write_text(path, "".join(f"{w} {', '.join(lemma_names(synset_of(w)))}\n" for w in wnids))

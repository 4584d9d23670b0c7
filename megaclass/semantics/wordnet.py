"""WordNet 3.0 through NLTK's reader, with no download.

Where the data comes from, first found wins:
  1. an NLTK data directory that already has corpora/wordnet (NLTK_DATA or NLTK's default roots);
  2. Debian's `wordnet-base` + `wordnet-sense-index` (/usr/share/wordnet), copied into an NLTK data
     directory that megaclass manages (MEGACLASS_NLTK_DATA, default ~/.cache/megaclass/nltk_data).
     NLTK refuses corpus paths outside its data roots, even through links, and needs a `lexnames`
     file that Debian does not ship, so the files are copied and `lexnames` is written.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import warnings
from pathlib import Path

DEBIAN_WORDNET = Path("/usr/share/wordnet")

# WordNet 3.0's 45 lexicographer files: number, name, syntactic category.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_CATEGORY = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
_FILES = [f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")] + [
    f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")
]
_OPTIONAL = ["index.sense", "cntlist.rev"]


class WordNetNotFound(RuntimeError):
    pass


def managed_data_dir() -> Path:
    return Path(os.environ.get("MEGACLASS_NLTK_DATA", Path.home() / ".cache" / "megaclass" / "nltk_data"))


def _lexnames_text() -> str:
    return "".join(f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES))


def _nltk_root_with_wordnet() -> Path | None:
    import nltk

    roots = [managed_data_dir()] + [Path(p) for p in nltk.data.path]
    for root in roots:
        corpus = root / "corpora" / "wordnet"
        if (corpus / "data.noun").is_file() and (corpus / "lexnames").is_file():
            return root
        if (root / "corpora" / "wordnet.zip").is_file():
            return root
    return None


def _install_from_debian(source: Path, root: Path) -> Path:
    """Copy Debian's files into `root/corpora/wordnet` atomically (a temp dir renamed into place)."""
    missing = [f for f in _FILES if not (source / f).is_file()]
    if missing:
        raise WordNetNotFound(f"{source} lacks {', '.join(missing)}")
    (root / "corpora").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=root / "corpora"))
    for name in _FILES + [f for f in _OPTIONAL if (source / f).is_file()]:
        shutil.copyfile(source / name, staging / name)
    (staging / "lexnames").write_text(_lexnames_text())
    target = root / "corpora" / "wordnet"
    try:
        os.rename(staging, target)
    except OSError:  # another process got there first
        shutil.rmtree(staging, ignore_errors=True)
    return root


def ensure_wordnet() -> Path:
    """Return an NLTK data root holding WordNet 3.0, arranging one from Debian's files if needed."""
    root = _nltk_root_with_wordnet()
    if root is None and (DEBIAN_WORDNET / "data.noun").is_file():
        root = _install_from_debian(DEBIAN_WORDNET, managed_data_dir())
    if root is None:
        raise WordNetNotFound(
            "WordNet 3.0 not found. Either (a) point NLTK_DATA at an NLTK data directory that has "
            "corpora/wordnet, or (b) install Debian's packages: "
            "`apt-get install wordnet-base wordnet-sense-index` (`make setup` does this when run as root)."
        )
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


@functools.lru_cache(maxsize=1)
def wordnet():
    """NLTK's WordNet corpus reader (loaded once per process)."""
    ensure_wordnet()
    from nltk.corpus import wordnet as wn

    wn.ensure_loaded()
    return wn


def synset_of(wnid: str):
    """`n01440764` -> the WordNet 3.0 synset (part of speech + offset). KeyError if unknown."""
    if len(wnid) < 2 or not wnid[1:].isdigit():
        raise KeyError(wnid)
    try:
        with warnings.catch_warnings():  # NLTK warns and returns None for an offset it lacks
            warnings.simplefilter("ignore", UserWarning)
            synset = wordnet().synset_from_pos_and_offset(wnid[0], int(wnid[1:]))
    except Exception as exc:  # NLTK raises WordNetError / ValueError for malformed offsets
        raise KeyError(wnid) from exc
    if synset is None:
        raise KeyError(wnid)
    return synset


def wnid_of(synset) -> str:
    return f"{synset.pos()}{synset.offset():08d}"


def hypernyms(synset, instances: bool = False) -> list:
    """The direct hypernyms of `synset` in offset order (NLTK returns them in set order, which
    changes with the string-hash seed). instances=True adds the instance links (a named entity's
    class, e.g. a particular city's "city"), which `ancestors` and class texts follow; the synthetic
    data set's sibling groups use the class links alone."""
    found = synset.hypernyms() + (synset.instance_hypernyms() if instances else [])
    return sorted(found, key=lambda h: h.offset())

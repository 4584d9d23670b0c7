"""The embedded default data set: a small WebVision in exactly the published layout, with web-like noise.

Categories are real WordNet 3.0 synsets from the 1,000 ILSVRC-2012 classes (WebVision 1.0's), chosen so
that confusions are possible: senses that share a name (crane the bird / crane the machine, Cardigan
the corgi / cardigan the sweater) and WordNet siblings (classes with the same direct hypernym).

Noise model (docs/data.md, "The synthetic data set", gives the reasoning):
- P(wrong label | source, rank) = start + (end - start) · min(1, (rank - 1) / (depth - 1)), with
  `depth` the mean number of images per query and source; Flickr starts and ends noisier than Google.
- A wrong image shows a confusable class (the homonym's other sense, or a sibling), an unrelated
  class, or an open-set outlier (an ILSVRC category outside the class list).
- Metadata text is informative with a per-source probability: it then describes what the image
  really shows (its names, hypernyms, hyponyms, words of its gloss), and a wrong image's text may
  still contain the query word. Otherwise the text is only the query word, camera file names, URLs
  and filler.

`noise` picks one of NOISE_MODELS (`megaclass synth --noise MODEL`); "web" is the mix above, the others
isolate one kind of web noise each (docs/weighting.md, "The noise-model suite").

Images are `image_size`² JPEGs drawn from a per-concept prototype (smooth random colour field plus a
blob); siblings share most of their prototype, so they look alike. Each image adds a shift, contrast
change, a random background field and pixel noise. Everything is a function of the seed.
"""
from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

TRUTH_FILE = "truth_train.tsv"
CONFIG_FILE = "synth.json"
NOISE_KINDS = ("confusable", "unrelated", "outlier")
NOISE_MODELS = {
    "web": "the default mix: WordNet confusions, unrelated classes, open-set outliers; noise rises with rank",
    "uniform": "a wrong image shows a class drawn uniformly from the other classes",
    "wordnet": "a wrong image shows a WordNet neighbour (sibling or homonym) of its label",
    "homonym": "a wrong image shows the other sense of a shared name where the label has one, else a sibling",
    "outlier-query": "a wrong image shows an open-set outlier and its page always keeps the query word",
    "flat-rank": "the web mix at a wrong-label rate that does not depend on the rank",
    "no-text": "the web mix, and 60 % of the pages carry no text at all (no title, description or tags)",
}

FILLER = ("photo image picture wallpaper hd free download best new beautiful amazing stock vintage "
          "nikon canon travel summer holiday view day great top cool nice lovely flickr my").split()
STOP = "the of and with at in on a for my this is from by to".split()


@dataclass(kw_only=True, slots=True)
class SynthConfig:
    """What `megaclass synth` generates. Defaults: 64 classes × ~80 training images, 32×32 pixels."""

    classes: int = 64
    """number of categories (at most ~900)"""
    per_class: int = 80
    """mean training images per class, Google and Flickr together"""
    val_per_class: int = 20
    """clean validation images per class"""
    seed: int = 0
    image_size: int = 32
    imbalance: float = 0.5
    """class sizes are uniform in per_class · [1 - imbalance, 1 + imbalance]"""
    google_fraction: float = 0.5
    google_noise: tuple[float, float] = (0.10, 0.55)
    """P(wrong label) at the top rank and from `depth` on, Google"""
    flickr_noise: tuple[float, float] = (0.20, 0.65)
    """the same for Flickr"""
    noise_mix: tuple[float, float, float] = (0.45, 0.30, 0.25)
    """share of wrong images showing a confusable class, an unrelated class, an open-set outlier"""
    informative: tuple[float, float] = (0.70, 0.80)
    """P(metadata describes the image), Google and Flickr"""
    outlier_concepts: int = 24
    """open-set categories that outlier images show"""
    noise: str = "web"
    """the noise model, one of NOISE_MODELS; anything but "web" overrides noise_mix (and, for
    flat-rank, the rank dependence; for outlier-query and no-text, the page text)"""

    def __post_init__(self):
        if not 2 <= self.classes <= 900:
            raise ValueError(f"classes must be in [2, 900], got {self.classes}")
        if self.per_class < 2 or self.val_per_class < 0:
            raise ValueError(f"per_class must be ≥ 2 and val_per_class ≥ 0, got {self.per_class}, {self.val_per_class}")
        if not 8 <= self.image_size <= 256:
            raise ValueError(f"image_size must be in [8, 256], got {self.image_size}")
        if not 0 <= self.imbalance < 1 or not 0 < self.google_fraction < 1:
            raise ValueError("imbalance must be in [0, 1) and google_fraction in (0, 1)")
        for name in ("google_noise", "flickr_noise", "informative"):
            if any(not 0 <= p <= 1 for p in getattr(self, name)):
                raise ValueError(f"{name} must hold probabilities, got {getattr(self, name)}")
        if abs(sum(self.noise_mix) - 1) > 1e-6 or min(self.noise_mix) < 0:
            raise ValueError(f"noise_mix must be three non-negative shares summing to 1, got {self.noise_mix}")
        if self.noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {', '.join(NOISE_MODELS)}, got {self.noise!r}")

    @property
    def mix(self) -> tuple[float, float, float]:
        """The shares of NOISE_KINDS this noise model uses."""
        return {"uniform": (0.0, 1.0, 0.0), "wordnet": (1.0, 0.0, 0.0), "homonym": (1.0, 0.0, 0.0),
                "outlier-query": (0.0, 0.0, 1.0)}.get(self.noise, self.noise_mix)

    @property
    def query_word_rate(self) -> float:
        """P(the page of an image showing another concept still carries the query word)."""
        return 1.0 if self.noise == "outlier-query" else 0.5

    @property
    def textless_rate(self) -> float:
        """P(a page has no text at all)."""
        return 0.6 if self.noise == "no-text" else 0.0


@dataclass(slots=True)
class Concept:
    """A WordNet category as the generator sees it: names for the query, words for its metadata."""

    wnid: str
    names: list[str]
    related: list[str]
    gloss: list[str]
    query: str = ""  # the search query: the shared name for homonyms, else the first name
    group: int = -1  # visual group: siblings share one
    homonyms: list[int] = field(default_factory=list)  # class indices sharing a name


def _concept(wnid: str) -> Concept:
    from megaclass.semantics.wordnet import hypernyms, synset_of

    syn = synset_of(wnid)
    names = [n.replace("_", " ") for n in syn.lemma_names()]
    related = []
    for hyper in hypernyms(syn) + [h for p in hypernyms(syn) for h in hypernyms(p)]:
        related += [n.replace("_", " ") for n in hyper.lemma_names()[:2]]
    for hypo in sorted(syn.hyponyms(), key=lambda h: h.offset())[:6]:
        related.append(hypo.lemma_names()[0].replace("_", " "))
    gloss = [w.strip(";,.()'\"") for w in syn.definition().split()]
    gloss = [w for w in gloss if len(w) > 3 and w.lower() not in STOP]
    return Concept(wnid, names, related, gloss, query=names[0])


def choose_categories(cfg: SynthConfig, rng: np.random.Generator) -> tuple[list[Concept], list[Concept]]:
    """Classes (sorted by wnid, as synsets.txt is) and open-set outlier concepts.

    About a quarter of the classes come in homonym pairs, about 40 % in sibling groups of 2–3, the
    rest are single; outliers are ILSVRC categories that are neither classes nor their siblings.
    """
    from megaclass.semantics.synsets import imagenet1k_wnids
    from megaclass.semantics.wordnet import hypernyms, synset_of, wnid_of

    pool = imagenet1k_wnids()
    synsets = {w: synset_of(w) for w in pool}
    by_name: dict[str, list[str]] = {}
    by_parent: dict[str, list[str]] = {}
    for w, syn in synsets.items():
        for name in syn.lemma_names():
            by_name.setdefault(name.lower(), []).append(w)
        for hyper in hypernyms(syn):
            by_parent.setdefault(wnid_of(hyper), []).append(w)
    pairs = sorted({tuple(sorted(set(ws)))[:2] for ws in by_name.values() if len(set(ws)) >= 2})
    parents = sorted(p for p, ws in by_parent.items() if len(ws) >= 2)
    chosen: list[str] = []
    for i in rng.permutation(len(pairs))[: max(1, cfg.classes // 8)]:
        chosen += [w for w in pairs[i] if w not in chosen]
    for i in rng.permutation(len(parents)):
        if len(chosen) >= cfg.classes * 0.65:
            break
        kids = [w for w in by_parent[parents[i]] if w not in chosen]
        chosen += list(rng.choice(kids, size=min(len(kids), int(rng.integers(2, 4))), replace=False))
    taken_parents = {wnid_of(h) for w in chosen for h in hypernyms(synsets[w])}
    free = [w for w in pool if w not in chosen and not {wnid_of(h) for h in hypernyms(synsets[w])} & taken_parents]
    order = rng.permutation(len(free))
    chosen = sorted(chosen[: cfg.classes] + [free[i] for i in order[: max(0, cfg.classes - len(chosen))]])
    outlier_ids = [free[i] for i in order if free[i] not in chosen][: cfg.outlier_concepts]

    classes = [_concept(w) for w in chosen]
    index = {w: i for i, w in enumerate(chosen)}
    groups: dict[str, int] = {}
    parent_of = {w: wnid_of(hypernyms(synsets[w])[0]) if synsets[w].hypernyms() else w for w in chosen}
    for i, w in enumerate(chosen):
        if sum(parent_of[w] == parent_of[v] for v in chosen) > 1:
            classes[i].group = groups.setdefault(parent_of[w], len(groups))
        names = [n.lower() for n in synsets[w].lemma_names()]
        for v in chosen:
            shared = [n for n in names if v != w and n in {m.lower() for m in synsets[v].lemma_names()}]
            if shared:
                classes[i].homonyms.append(index[v])
                classes[i].query = shared[0].replace("_", " ")
    return classes, [_concept(w) for w in outlier_ids]


def _smooth_field(rng: np.random.Generator, size: int, waves: int = 6) -> np.ndarray:
    """A random low-frequency colour field [size, size, 3] with zero mean and unit std."""
    yy, xx = np.meshgrid(np.arange(size) / size, np.arange(size) / size, indexing="ij")
    out = np.zeros((size, size, 3))
    for _ in range(waves):
        fy, fx = rng.uniform(-3.5, 3.5, size=2)
        wave = np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi))
        out += wave[..., None] * rng.normal(size=3)
    cy, cx = rng.uniform(0.2, 0.8, size=2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * rng.uniform(0.08, 0.18) ** 2))
    out += 2.5 * blob[..., None] * rng.normal(size=3)
    return (out - out.mean()) / (out.std() + 1e-8)


def _prototypes(classes: list[Concept], outliers: list[Concept], size: int, rng) -> np.ndarray:
    """[classes + outliers, size, size, 3]; siblings are 70 % a shared group field."""
    group_fields = {}
    protos = []
    for concept in classes + outliers:
        own = _smooth_field(rng, size)
        if concept.group >= 0:
            shared = group_fields.setdefault(concept.group, _smooth_field(rng, size))
            own = 0.7 * shared + 0.3 * own
            own = (own - own.mean()) / own.std()
        protos.append(own)
    return np.stack(protos)


def _render(proto: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One image of a concept: shifted, contrast-jittered prototype + background field + pixel noise."""
    size = proto.shape[0]
    shift = rng.integers(-size // 8, size // 8 + 1, size=2)
    x = np.roll(proto, tuple(shift), axis=(0, 1)) * rng.uniform(0.7, 1.3)
    x = x + 0.6 * _smooth_field(rng, size, waves=3) + rng.normal(scale=0.35, size=proto.shape)
    return np.clip(128 + 45 * x, 0, 255).astype(np.uint8)


def _words(rng, items: list[str], k: int) -> list[str]:
    return [items[i] for i in rng.choice(len(items), size=min(k, len(items)), replace=False)] if items else []


def _text(rng, shown: Concept | None, query: str, source: str, query_word_rate: float = 0.5) -> dict:
    """Metadata for one image. `shown` None means uninformative: only the query word and filler."""
    year = str(int(rng.integers(2005, 2018)))
    if shown is None:
        title = rng.choice([query, f"IMG_{int(rng.integers(1000, 9999))}.JPG", f"{query} {rng.choice(FILLER)}",
                            f"{rng.choice(FILLER)} {rng.choice(FILLER)} &amp; {query}", f"DSC{int(rng.integers(10000, 99999))}"])
        description = rng.choice(["", f"{rng.choice(FILLER)} {rng.choice(STOP)} {query} http://www.example.com/{year}/img.jpg",
                                  f"free {rng.choice(FILLER)} download at http://pics.example.org/{int(rng.integers(100, 999))}"])
        tags = [query.lower(), rng.choice(FILLER), year]
    else:
        name = rng.choice(shown.names)
        related = _words(rng, shown.related, 2)
        title = " ".join([rng.choice(FILLER), name] + related[:1] + [rng.choice(FILLER)])
        description = " ".join(_words(rng, shown.gloss, 4) + [rng.choice(STOP)] + related[1:]
                               + [rng.choice(["&quot;" + rng.choice(FILLER) + "&quot;", "", year, "photo.jpg"])])
        tags = [n.lower() for n in _words(rng, shown.names, 2) + related] + [rng.choice(FILLER), year]
        if query.lower() not in " ".join(shown.names).lower() and rng.random() < query_word_rate:
            title = f"{query} {title}"  # the engine matched the query word somewhere on the page
    if query_word_rate >= 1.0 and query.lower() not in str(title).lower():
        title = f"{query} {title}"  # every page the engine returned matched the query word
    entry = {"title": str(title), "description": str(description).strip()}
    if source == "flickr":
        entry["tags"] = [str(t) for t in tags]
    return entry


def _what_is_shown(rng, c: int, classes: list[Concept], outliers: int, cfg: SynthConfig) -> tuple[str, int]:
    """A wrong image under label c: (kind, concept index; outliers follow the classes)."""
    kind = NOISE_KINDS[rng.choice(3, p=cfg.mix)]
    siblings = [i for i, k in enumerate(classes) if k.group >= 0 and k.group == classes[c].group and i != c]
    confusable = classes[c].homonyms + siblings
    if kind == "confusable" and confusable:
        share = 1.0 if cfg.noise == "homonym" else 0.6
        pick = classes[c].homonyms if classes[c].homonyms and rng.random() < share else confusable
        return kind, int(rng.choice(pick))
    if kind == "outlier":
        return kind, len(classes) + int(rng.integers(outliers))
    return "unrelated", int(rng.choice([i for i in range(len(classes)) if i != c]))


def _image_id(rng) -> str:
    alphabet = np.array(list(string.ascii_letters + string.digits + "_-"))
    return "".join(rng.choice(alphabet, size=14))


def _save_jpeg(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, quality=95)


def generate(out: str | os.PathLike, cfg: SynthConfig | None = None, progress: bool = True) -> dict:
    """Write the data set to `out` (must be empty or absent). Returns its statistics.

    Everything is written into a hidden sibling folder that is renamed to `out` at the very end, so
    `out` either holds a complete data set or nothing: a killed run cannot leave a partial one that
    a later run would take for complete (a killed run's `.<out>.*` sibling is safe to delete).
    """
    cfg = cfg or SynthConfig()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: not empty; synth writes a fresh data set")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        summary = _generate(work, cfg, progress)
        os.chmod(work, 0o755)  # mkdtemp makes 0700; a data set is meant to be shared
        os.replace(work, out)  # atomic; replaces an empty `out`, fails on one filled meanwhile
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary


def _generate(out: Path, cfg: SynthConfig, progress: bool) -> dict:
    """The data set into the existing empty folder `out`."""
    rng = np.random.default_rng(cfg.seed)
    classes, outliers = choose_categories(cfg, rng)
    concepts = classes + outliers
    protos = _prototypes(classes, outliers, cfg.image_size, rng)
    queries = [c.query for c in classes]
    sizes = np.maximum(2, np.round(cfg.per_class * rng.uniform(1 - cfg.imbalance, 1 + cfg.imbalance, len(classes)))).astype(int)
    depth = {"google": cfg.per_class * cfg.google_fraction, "flickr": cfg.per_class * (1 - cfg.google_fraction)}
    noise = {"google": cfg.google_noise, "flickr": cfg.flickr_noise}
    informative = {"google": cfg.informative[0], "flickr": cfg.informative[1]}

    (out / "info").mkdir()
    (out / "val_images_256").mkdir()
    filelists = {"google": [], "flickr": []}
    truth = ["# path\tclean\ttrue_wnid\tkind"]
    stats = Counter()
    steps = range(len(classes))
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="synth classes", unit="class")
    for c in steps:
        n_google = int(round(sizes[c] * cfg.google_fraction))
        for source, n in (("google", n_google), ("flickr", sizes[c] - n_google)):
            query_dir = f"q{c + 1:04d}"
            (out / source / query_dir).mkdir(parents=True, exist_ok=True)
            entries = []
            start, end = noise[source]
            for rank in range(1, n + 1):
                p_wrong = start + (end - start) * min(1.0, (rank - 1) / max(1.0, depth[source] - 1))
                if cfg.noise == "flat-rank":  # the same overall rate, spread evenly over the ranks
                    p_wrong = float(np.mean([start + (end - start) * min(1.0, (q - 1) / max(1.0, depth[source] - 1))
                                             for q in range(1, n + 1)]))
                kind, proto = _what_is_shown(rng, c, classes, len(outliers), cfg) if rng.random() < p_wrong \
                    else ("clean", c)
                shown = concepts[proto]
                image_id = _image_id(rng)
                path = f"{source}/{query_dir}/{image_id}.jpg"
                _save_jpeg(_render(protos[proto], rng), out / path)
                text_of = shown if rng.random() < informative[source] else None
                entry = {"id": image_id, "rank": rank, **_text(rng, text_of, queries[c], source, cfg.query_word_rate)}
                if cfg.textless_rate and rng.random() < cfg.textless_rate:
                    entry.update(title="", description="")
                    entry.pop("tags", None)
                for key, p_missing in (("description", 0.03), ("title", 0.01), ("rank", 0.005)):
                    if rng.random() < p_missing:
                        entry.pop(key, None)
                entries.append(entry)
                filelists[source].append(f"{path} {c}")
                truth.append(f"{path}\t{int(kind == 'clean')}\t{shown.wnid}\t{kind}")
                stats[f"{source}_{kind}"] += 1
            order = rng.permutation(len(entries))  # published lists are not in rank order
            listing = json.dumps([entries[i] for i in order], ensure_ascii=False)
            (out / source / f"{query_dir}.json").write_text(listing, encoding="utf-8")
        for v in range(cfg.val_per_class):
            name = f"val{c:04d}_{v:03d}.jpg"
            _save_jpeg(_render(protos[c], rng), out / "val_images_256" / name)
            filelists.setdefault("val", []).append(f"{name} {c}")

    info = out / "info"

    def write(path: Path, text: str) -> None:  # plain writes: the whole folder is renamed into place at once
        path.write_text(text, encoding="utf-8")

    write(info / "synsets.txt", "".join(f"{k.wnid} {', '.join(k.names)}\n" for k in classes))
    for source in ("google", "flickr"):
        write(info / f"train_filelist_{source}.txt", "\n".join(filelists[source]) + "\n")
        write(info / f"queries_{source}.txt", "".join(f"{c + 1} {q}\n" for c, q in enumerate(queries)))
    write(info / "queries_synsets_map.txt", "".join(f"{c + 1} {c + 1}\n" for c in range(len(classes))))
    write(info / "val_filelist.txt", "\n".join(filelists.get("val", [])) + "\n")
    write(out / TRUTH_FILE, "\n".join(truth) + "\n")
    total = sum(stats.values())
    summary = {
        "config": asdict(cfg),
        "train_images": total,
        "val_images": len(filelists.get("val", [])),
        "wrong_label_rate": round(1 - (stats["google_clean"] + stats["flickr_clean"]) / total, 4),
        "counts": dict(sorted(stats.items())),
        "homonym_classes": sum(bool(k.homonyms) for k in classes),
        "sibling_classes": sum(k.group >= 0 for k in classes),
        "outlier_wnids": [k.wnid for k in outliers],
    }
    write(out / CONFIG_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


@dataclass(frozen=True, slots=True)
class Truth:
    """The generator's knowledge of one training image."""

    clean: bool
    true_wnid: str
    kind: str  # "clean" or one of NOISE_KINDS


def read_truth(root: str | os.PathLike) -> dict[str, Truth] | None:
    """`ROOT/truth_train.tsv` -> {path as in the filelist: Truth}; None when the file is absent."""
    path = Path(root) / TRUTH_FILE
    if not path.is_file():
        return None
    truth = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 4 or parts[1] not in ("0", "1"):
            raise ValueError(f"{path}:{lineno}: expected 'path<TAB>0|1<TAB>wnid<TAB>kind', got {line!r}")
        truth[parts[0]] = Truth(parts[1] == "1", parts[2], parts[3])
    return truth

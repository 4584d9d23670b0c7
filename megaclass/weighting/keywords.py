"""Keywords from web metadata (title, description, tags).

Steps, in order: HTML unescaping (`&amp;` -> `&`) and tag removal, URLs removed, file suffixes
removed (`photo.jpg` -> `photo`), lower case, tokens = runs of letters (so digits and punctuation go),
tokens shorter than two letters dropped, stop words dropped (NLTK's English list, shipped here, plus
web boilerplate such as `img`, `jpg`, `wallpaper`), WordNet lemmatization as nouns (NLTK's
`WordNetLemmatizer` on the offline WordNet), stop words dropped again after lemmatization, and
duplicates dropped (first occurrence kept). Lemmas are cached per token, so a million images cost
seconds, not minutes.
"""
from __future__ import annotations

import html
import re
from collections.abc import Iterable

# NLTK's English stop word list (nltk_data corpora/stopwords/english), shipped to avoid a download.
ENGLISH_STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him
his himself she she's her hers herself it it's its itself they them their theirs themselves what which who
whom this that that'll these those am is are was were be been being have has had having do does did doing
a an the and but if or because as until while of at by for with about against between into through during
before after above below to from up down in out on off over under again further then once here there when
where why how all any both each few more most other some such no nor not only own same so than too very s
t can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't
doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't
shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())

# Words that appear on web pages of every category and therefore say nothing about any one of them.
WEB_STOP_WORDS = frozenset("""
img dsc dscn dcim jpg jpeg png gif bmp tif tiff webp http https www com org net html htm php
photo photograph image picture pic wallpaper hd free download stock flickr
""".split())

STOP_WORDS = ENGLISH_STOP_WORDS | WEB_STOP_WORDS

_TAG = re.compile(r"<[^>]{0,200}>")
_URL = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.)\S*", re.IGNORECASE)
_SUFFIX = re.compile(r"\.(?:jpe?g|png|gif|bmp|tiff?|webp|heic|raw|html?|php|aspx?|jsp)\b", re.IGNORECASE)
_TOKEN = re.compile(r"[^\W\d_]+")
# The same three on text already lower-cased, for ASCII text: there lower-casing first changes nothing
# the case-blind patterns see, and a letter is [a-z] (twice as fast as the Unicode classes).
_URL_LOWER = re.compile(_URL.pattern)
_SUFFIX_LOWER = re.compile(_SUFFIX.pattern)
_ASCII_TOKEN = re.compile(r"[a-z]+")


class KeywordExtractor:
    """`extractor(title, description, tags) -> ["crane", "bird", ...]`; any number of text pieces."""

    def __init__(self, stop_words: Iterable[str] = STOP_WORDS, min_length: int = 2):
        from nltk.stem import WordNetLemmatizer

        from megaclass.semantics.wordnet import ensure_wordnet

        ensure_wordnet()
        self.stop_words = frozenset(stop_words)
        self.min_length = min_length
        self._lemmatize = WordNetLemmatizer().lemmatize
        self._lemma: dict[str, str | None] = {}

    def _lemma_of(self, token: str) -> str | None:
        lemma = None
        if len(token) >= self.min_length and token not in self.stop_words:
            lemma = self._lemmatize(token)
            lemma = None if lemma in self.stop_words else lemma
        return lemma

    def __call__(self, *texts: str | None) -> list[str]:
        text = " ".join(filter(None, texts))
        if "&" in text:
            text = html.unescape(text)
        if "<" in text:
            text = _TAG.sub(" ", text)
        if text.isascii():
            text = text.lower()
            if "://" in text or "www." in text:  # the regexes try every position: only where they can match
                text = _URL_LOWER.sub(" ", text)
            if "." in text:
                text = _SUFFIX_LOWER.sub(" ", text)
            tokens = _ASCII_TOKEN.findall(text)
        else:
            tokens = _TOKEN.findall(_SUFFIX.sub(" ", _URL.sub(" ", text)).lower())
        try:  # one C-level lookup per token once its lemma is cached: 16M pages have ~500M tokens
            lemmas = list(map(self._lemma.__getitem__, tokens))
        except KeyError:
            for token in tokens:
                if token not in self._lemma:
                    self._lemma[token] = self._lemma_of(token)
            lemmas = list(map(self._lemma.__getitem__, tokens))
        return list(dict.fromkeys(filter(None, lemmas)))  # None: dropped; repeats: the first kept

"""The built-in ``chapter_analysis`` handler: deterministic statistics of a chapter's text."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any

from app.services.handlers import JobContext, PermanentError, handler

WORDS_PER_MINUTE = 238
TOP_KEYWORDS = 10
LONGEST_SENTENCES = 3
MIN_KEYWORD_LETTERS = 3
#: Longer texts are analysed in a thread, off the event loop (200,000 characters took
#: ~60 ms on it: every other job, the heartbeat and the claims waited that long).
OFFLOAD_CHARS = 20_000

STOP_WORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers herself him himself his how
    i if in into is it its itself just me more most my myself no nor not now of off on
    once only or other our ours ourselves out over own same she should so some such than
    that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves said says one two into upon like
    """.split()
)

_WORD = re.compile(r"[A-Za-z]+(?:['\u2019][A-Za-z]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?\u2026])[\"\u201d\u2019)]*\s+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# An opening curly quote ends a quotation's search (“[^“”]*”): with “[^”]*”, a text of
# many “ and no ” made each “ scan to the end, quadratic (a 1 MB payload of “ froze the
# daemon for a minute; the job's timeout cannot interrupt a regex holding the GIL).
_QUOTED = re.compile(r"\"[^\"]*\"|“[^“”]*”")
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")


def split_words(text: str) -> list[str]:
    """Word tokens (letters, with inner apostrophes)."""
    return _WORD.findall(text)


def split_sentences(text: str) -> list[str]:
    """Sentences, split after ., ! or ? (and closing quotes) followed by white space."""
    flat = " ".join(text.split())
    return [s.strip() for s in _SENTENCE_END.split(flat) if split_words(s)]


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs: blocks separated by blank lines."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def count_syllables(word: str) -> int:
    """A simple, deterministic English syllable estimate (at least 1)."""
    lowered = word.lower().replace("\u2019", "'")
    groups = len(_VOWEL_GROUPS.findall(lowered))
    if lowered.endswith("e") and not lowered.endswith(("le", "ee")) and groups > 1:
        groups -= 1
    return max(1, groups)


def flesch_reading_ease(words: list[str], sentence_count: int) -> float:
    """Flesch reading ease: higher is easier (about 60-70 is plain English)."""
    if not words or not sentence_count:
        return 0.0
    syllables = sum(count_syllables(w) for w in words)
    score = 206.835 - 1.015 * (len(words) / sentence_count) - 84.6 * (syllables / len(words))
    return round(score, 1)


def top_keywords(words: list[str], limit: int = TOP_KEYWORDS) -> list[dict[str, Any]]:
    """The most frequent words of 3+ letters that are not stop words; ties alphabetical."""
    counts = Counter(
        w.lower() for w in words if len(w) >= MIN_KEYWORD_LETTERS and w.lower() not in STOP_WORDS
    )
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return [{"word": word, "count": count} for word, count in ranked]


def longest_sentences(sentences: list[str], limit: int = LONGEST_SENTENCES) -> list[dict[str, Any]]:
    """The longest sentences by word count; ties keep their order of appearance."""
    sized = [(len(split_words(s)), i, s) for i, s in enumerate(sentences)]
    ranked = sorted(sized, key=lambda item: (-item[0], item[1]))[:limit]
    return [{"text": text, "words": words} for words, _, text in ranked]


def dialogue_ratio(text: str) -> float:
    """Share of the text's characters that stand inside double quotes."""
    if not text:
        return 0.0
    quoted = sum(len(m) for m in _QUOTED.findall(text))
    return round(quoted / len(text), 3)


def analyze_chapter(text: str, title: str | None = None) -> dict[str, Any]:
    """Every statistic of the chapter, as a JSON-ready dict (same input, same output)."""
    words = split_words(text)
    sentences = split_sentences(text)
    return {
        "title": title,
        "word_count": len(words),
        "sentence_count": len(sentences),
        "paragraph_count": len(split_paragraphs(text)),
        "character_count": len(text),
        "average_sentence_length": round(len(words) / len(sentences), 2) if sentences else 0.0,
        "reading_time_minutes": round(len(words) / WORDS_PER_MINUTE, 2),
        "readability": flesch_reading_ease(words, len(sentences)),
        "top_keywords": top_keywords(words),
        "longest_sentences": longest_sentences(sentences),
        "dialogue_ratio": dialogue_ratio(text),
    }


def _text_of(payload: dict[str, Any]) -> tuple[str, str | None]:
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip():
        raise PermanentError("payload.text must be a non-empty string (the chapter's text)")
    title = payload.get("title")
    return text, title if isinstance(title, str) else None


@handler("chapter_analysis")
async def chapter_analysis(ctx: JobContext) -> dict[str, Any]:
    """Analyse ``payload.text`` (and ``payload.title``); progress per stage."""
    text, title = _text_of(ctx.payload)
    stages = 3
    await ctx.progress(0, stages, "tokenizing")
    words = split_words(text)
    ctx.add_token_usage(len(words))
    await ctx.progress(1, stages, "analysing")
    if len(text) > OFFLOAD_CHARS:
        result = await asyncio.to_thread(analyze_chapter, text, title)
    else:
        result = analyze_chapter(text, title)
    await ctx.progress(2, stages, "summarising")
    await ctx.progress(stages, stages, "done")
    return result

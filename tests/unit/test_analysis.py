"""The built-in chapter_analysis handler: exact, deterministic statistics."""

from __future__ import annotations

from typing import Any

import pytest

from app.services import analysis
from app.services.handlers import REGISTRY, JobContext, PermanentError

TEXT = (
    'It was a bright cold day in April. "Hello," she said! The clocks were striking thirteen.'
    "\n\nWinston Smith slipped quickly through the glass doors of Victory Mansions."
)


def test_counts_by_hand() -> None:
    result = analysis.analyze_chapter(TEXT, "One")
    # 8 + 3 + 5 + 11 words; four sentences; two paragraphs
    assert (result["word_count"], result["sentence_count"], result["paragraph_count"]) == (27, 4, 2)
    assert result["character_count"] == len(TEXT) == 164
    assert result["average_sentence_length"] == 6.75
    assert result["reading_time_minutes"] == round(27 / 238, 2)
    assert result["dialogue_ratio"] == round(len('"Hello,"') / 164, 3)
    assert result["longest_sentences"] == [
        {
            "text": "Winston Smith slipped quickly through the glass doors of Victory Mansions.",
            "words": 11,
        },
        {"text": "It was a bright cold day in April.", "words": 8},
        {"text": "The clocks were striking thirteen.", "words": 5},
    ]
    assert result["title"] == "One"


def test_keywords_skip_stop_words_and_break_ties_alphabetically() -> None:
    words = analysis.split_words("The cat and the dog. The cat sat; a dog ran; the cat ate it.")
    assert analysis.top_keywords(words, 3) == [
        {"word": "cat", "count": 3},
        {"word": "dog", "count": 2},
        {"word": "ate", "count": 1},
    ]


@pytest.mark.parametrize(
    ("word", "syllables"), [("day", 1), ("table", 2), ("striking", 2), ("a", 1)]
)
def test_syllables(word: str, syllables: int) -> None:
    assert analysis.count_syllables(word) == syllables


def test_curly_quotes_count_as_dialogue() -> None:
    assert analysis.dialogue_ratio("“Hi” he said") == round(4 / 12, 3)


def test_many_opening_quotes_and_no_closing_one_are_linear_work() -> None:
    """Each “ stops the search of the one before it: with “[^”]*”, 349,000 of them (a
    1 MB payload) took about a minute and froze the daemon's event loop."""
    assert analysis.dialogue_ratio("“" * 300_000) == 0.0
    assert analysis.dialogue_ratio("“a “b” c") == round(len("“b”") / len("“a “b” c"), 3)
    assert analysis.analyze_chapter("“" * 300_000 + " word.")["dialogue_ratio"] == 0.0


def test_deterministic() -> None:
    assert analysis.analyze_chapter(TEXT) == analysis.analyze_chapter(TEXT)


async def run(
    payload: dict[str, Any],
) -> tuple[Any, list[tuple[int, int | None, str | None]], JobContext]:
    calls: list[tuple[int, int | None, str | None]] = []

    async def sink(current: int, total: int | None, message: str | None) -> None:
        calls.append((current, total, message))

    ctx = JobContext(task_id=1, kind="chapter_analysis", payload=payload, progress_sink=sink)
    entry = REGISTRY.get("chapter_analysis")
    assert entry is not None
    return await entry.func(ctx), calls, ctx


async def test_handler_reports_progress_and_tokens() -> None:
    result, calls, ctx = await run({"text": TEXT, "title": "One"})
    assert result == analysis.analyze_chapter(TEXT, "One")
    assert [c[0] for c in calls] == [0, 1, 2, 3] and all(c[1] == 3 for c in calls)
    assert calls[-1][2] == "done"
    assert ctx.token_usage == 27


@pytest.mark.parametrize("payload", [{}, {"text": ""}, {"text": "   \n"}, {"text": 42}])
async def test_handler_rejects_missing_text(payload: dict[str, Any]) -> None:
    with pytest.raises(PermanentError, match=r"payload\.text"):
        await run(payload)

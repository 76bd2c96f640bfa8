"""The constrained-decoding trie: one walk shared by the engines, the vLLM logits processor and SFT."""

from __future__ import annotations

import pytest

from empg_rllib.core.choices import ChoiceTrie, ChoiceWalk, walk
from empg_rllib.workflows.sft import allowed_along

# "go to desk 1", "go to drawer 1", "go to desk 10" as token ids: shared prefixes, and one
# choice that is a prefix of another.
CHOICES = [[5, 6, 7, 8], [5, 6, 9, 8], [5, 6, 7, 8, 3]]


def test_walk_records_the_allowed_ids_at_every_token_and_stops_where_a_choice_ends():
    taken, allowed, complete = walk(ChoiceTrie(CHOICES), [5, 6, 7, 8, 3, 4])
    assert complete and taken == [5, 6, 7, 8]
    assert allowed == [[5], [6], [7, 9], [8]]


def test_walk_stops_before_a_token_outside_every_choice():
    taken, allowed, complete = walk(ChoiceTrie(CHOICES), [5, 6, 4, 8])
    assert (taken, allowed, complete) == ([5, 6], [[5], [6]], False)


def test_the_cursor_allows_nothing_once_complete_or_off_the_trie():
    cursor = ChoiceWalk(ChoiceTrie(CHOICES))
    for token in (5, 6, 9):
        assert not cursor.complete
        cursor.advance(token)
    assert cursor.allowed() == [8]
    cursor.advance(8)
    assert cursor.complete and cursor.allowed() == []
    cursor.advance(3)  # past the end: left, even though [.., 8, 3] would continue another choice
    assert cursor.left and not cursor.complete and cursor.allowed() == []


@pytest.mark.parametrize(
    ("response", "expected"),
    [([5, 6, 9, 8], [[5], [6], [7, 9], [8]]), ([5, 6, 7], None), ([5, 6, 7, 8, 3], None), ([1], None)],
)
def test_sft_scores_only_responses_the_sampler_could_produce(response, expected):
    assert allowed_along(CHOICES, response) == expected


def test_an_empty_choice_is_refused():
    with pytest.raises(ValueError, match="no empty choice"):
        ChoiceTrie([[1], []])

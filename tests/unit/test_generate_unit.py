"""The generate stage's pure parts: parsing messy teacher text, rating, dedupe, seed selection."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from refinery.core import tasks
from refinery.core.config import ConfigError
from refinery.distill import selfinstruct as si
from refinery.distill.config import GenerateConfig
from refinery.distill.generate import Candidate, TaskPlan, _dedupe, apply_scores, held_out_index, seed_items


# ---- sub-topics ---------------------------------------------------------------------------------

def test_subtopics_from_numbered_list_with_chatter():
    reply = "1. Friendship and trust\n2) Apologizing after a fight.\n3 - Sharing with siblings\n4. Extra one\n"
    assert si.parse_subtopics(reply, 3) == ["Friendship and trust", "Apologizing after a fight",
                                            "Sharing with siblings"]


def test_subtopics_bullets_bold_preface_and_duplicates():
    reply = "Sure, here are some topics:\n- **Gravity**\n* gravity\n\u2022 Friction on ramps\n\n- ok"
    # the preface is chatter, "gravity" repeats "Gravity", "ok" is too short
    assert si.parse_subtopics(reply, 5) == ["Gravity", "Friction on ramps"]


def test_subtopics_comma_separated_single_line():
    assert si.parse_subtopics("1. cooking, sports, music, travel", 3) == ["cooking", "sports", "music"]


def test_subtopics_nothing_usable():
    assert si.parse_subtopics("1.\n\n2. ..\n", 3) == []


# ---- question/answer pairs --------------------------------------------------------------------

def test_pair_plain_reply_continuing_the_prefix():
    assert si.parse_pair(" Why do ice cubes float in water?\nAnswer: Ice is less dense than water.") == (
        "Why do ice cubes float in water?", "Ice is less dense than water.")


def test_pair_stops_at_blank_line_next_question_and_rating():
    reply = (" What makes a friend loyal?\nAnswer: They keep promises. Rating: 9\nThey also listen.\n\n"
             "Question: another one?\nAnswer: no")
    assert si.parse_pair(reply) == ("What makes a friend loyal?", "They keep promises.")


def test_pair_case_and_multiline_question():
    reply = " Tom dropped a glass.\nHow did he feel?\nANSWER:   embarrassed  \n"
    assert si.parse_pair(reply) == ("Tom dropped a glass. How did he feel?", "embarrassed")


@pytest.mark.parametrize("reply", [
    " What is the boiling point of water?",                              # no answer
    " Hi?\nAnswer: yes",                                                  # question too short
    " Why is the sky blue?\nAnswer: ",                                    # empty answer
    " Ben loves people. Question: Ben loves people. Question: Ben?\nAnswer: yes",  # repetition loop
    " Why is the sky blue?\nAnswer: " + "x" * 400,                         # answer too long
    " 1234567890 12345?\nAnswer: 4",                                      # no words
])
def test_pair_malformed_is_none(reply):
    assert si.parse_pair(reply) is None


# ---- rating -------------------------------------------------------------------------------------

def _lps(probs: dict[str, float]) -> list[float]:
    return [math.log(probs.get(r, 1e-12)) for r in si.RATINGS]


def test_rating_is_expected_value():
    assert si.expected_rating(_lps({"7": 1.0})) == pytest.approx(7.0, abs=1e-6)
    assert si.expected_rating(_lps({"2": 0.5, "8": 0.5})) == pytest.approx(5.0, abs=1e-6)


def test_rating_separates_ten_from_one():
    # "1" as a next token carries "10"'s mass too: P("1")=0.6 of which P("10")=0.4 is really a ten
    assert si.expected_rating(_lps({"1": 0.6, "10": 0.4})) == pytest.approx((1 * 0.2 + 10 * 0.4) / 0.6, abs=1e-6)
    assert si.expected_rating(_lps({"1": 0.5, "10": 0.5})) == pytest.approx(10.0, abs=1e-6)


def test_rating_needs_ten_logprobs():
    with pytest.raises(ValueError, match="ratings 1..10"):
        si.expected_rating([0.0] * 9)


def test_rating_prompt_anchors_scale_with_gold_and_wrong_choice():
    ex = si.example_of(tasks.Item("x", "Is ice cold?", ("Yes", "No"), 0))
    user, prefix = si.rating_request("Is fire hot?", "Yes", [ex])
    assert "Answer: Yes\nRating: 9" in user and "Answer: No\nRating: 2" in user
    assert user.endswith("Question: Is fire hot?\nAnswer: Yes") and prefix == "Rating: "


def test_scores_below_threshold_are_rejected():
    cands = [Candidate("t", "pair", f"q{i}", "a") for i in range(3)]
    apply_scores(cands, [4.9996, 4.9, 7.0], threshold=5.0)
    assert [c.score for c in cands] == [5.0, 4.9, 7.0]
    assert [c.reason for c in cands] == ["", "low_score", ""]
    with pytest.raises(ValueError, match="2 scores for 3"):
        apply_scores(cands, [1.0, 2.0], 5.0)


# ---- dedupe -------------------------------------------------------------------------------------

def test_normalize_and_exact_duplicates():
    idx = si.NearDupIndex(0.8)
    idx.add("Why do cats purr?")
    assert si.normalize("  Why do CATS purr ?! ") == "why do cats purr"
    assert idx.find("why do cats   purr")
    assert not idx.find("Why do dogs bark?")


def test_near_duplicate_one_word_changed():
    idx = si.NearDupIndex(0.8)
    idx.add("Alex gave Jordan a present for their birthday party last week. How would Jordan feel?")
    assert idx.find("Alex gave Jordan a gift for their birthday party last week. How would Jordan feel?")
    assert not idx.find("Jordan forgot Alex's birthday party. What will Alex want to do next?")


def test_near_duplicate_prefix_filter_matches_brute_force():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(30)]
    texts = [" ".join(rng.sample(vocab, rng.randint(3, 12))) for _ in range(300)]
    for t in (0.5, 0.7, 0.8, 1.0):
        idx = si.NearDupIndex(t)
        sets = []
        for text in texts:
            words = set(text.split())
            brute = any(len(words & s) / len(words | s) >= t for s in sets)
            assert idx.find(text) == brute, (t, text)
            idx.add(text)
            sets.append(words)


def test_near_duplicate_threshold_validated():
    with pytest.raises(ValueError, match="threshold"):
        si.NearDupIndex(0.0)


def test_dedupe_marks_held_out_copies_and_repeats():
    pool, held = tasks.split("strategyqa", 0.5)
    plan = TaskPlan("strategyqa", "d", pool[:2], pool)
    cands = [Candidate("strategyqa", "seed_answer", pool[0].question, "Yes"),
             Candidate("strategyqa", "pair", held[3].question.upper(), "No"),        # held-out item
             Candidate("strategyqa", "pair", pool[5].question, "Yes"),               # copies a seed item
             Candidate("strategyqa", "pair", "Would a penguin enjoy living in the Sahara desert?", "No"),
             Candidate("strategyqa", "pair", "Would a penguin enjoy living in the Sahara desert ?", "No"),
             Candidate("strategyqa", "pair", reason="malformed")]
    _dedupe(cands, [plan], held_out_index([_task("strategyqa", 0.5)], 0.8), 0.8)
    assert [c.reason for c in cands] == ["", "held_out", "duplicate", "", "duplicate", "malformed"]


# ---- seeds never come from the held-out split ---------------------------------------------------

def _task(name, fraction):
    return tasks.load_task(tasks.TasksConfig(names=[name], eval_fraction=fraction), name)


@pytest.mark.parametrize("name", sorted(tasks.OFFLINE))
def test_seed_items_only_from_seed_split(name):
    seed_split, held = tasks.split(name, 0.5)
    chosen, pool = seed_items(_task(name, 0.5), 8, seed=3)
    held_ids = {it.id for it in held}
    assert len(chosen) == min(8, len(seed_split)) and pool == seed_split
    assert all(it.id not in held_ids for it in chosen + pool)
    assert {it.id for it in chosen} <= {it.id for it in seed_split}


def test_seed_items_deterministic_per_seed():
    siqa = _task("siqa", 0.5)
    a = [it.id for it in seed_items(siqa, 8, seed=0)[0]]
    assert a == [it.id for it in seed_items(siqa, 8, seed=0)[0]]
    assert a != [it.id for it in seed_items(siqa, 8, seed=1)[0]]


def test_held_out_index_holds_every_held_out_question():
    _, held = tasks.split("winowhy", 0.3)
    idx = held_out_index([_task("winowhy", 0.3)], 0.8)
    assert len(idx.sets) == len(held) and all(idx.find(it.question) for it in held[:50])


# ---- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,msg", [
    ("score_threshold", 11.0, "score_threshold"), ("top_p", 0.0, "top_p"), ("shots", -1, "shots"),
    ("dedupe_threshold", 0.0, "dedupe_threshold"), ("seeds_per_task", 0, "seeds_per_task")])
def test_config_rejects_bad_values(field, value, msg):
    with pytest.raises(ConfigError, match=msg):
        GenerateConfig(**{field: value})


def test_quickstart_generate_section_loads():
    from refinery.pipeline.config import load

    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    cfg = load(quickstart)
    assert isinstance(cfg.generate, GenerateConfig)
    with pytest.raises(ConfigError, match="generate.engine"):
        load(quickstart, ["generate.engine=tgi"])


def test_make_engine_rejects_unknown_name():
    from refinery.distill.engines import make_engine

    with pytest.raises(ValueError, match="generate.engine"):
        make_engine("tgi", "/nonexistent")

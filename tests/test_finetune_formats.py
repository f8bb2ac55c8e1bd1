"""Reading labelled JSONL files for task fine-tuning: format detection, label vocabularies, the held-out split,
and the one-line errors a user can act on."""

from __future__ import annotations

import json

import pytest

from gptjax.data.sources import is_validation
from gptjax.errors import TaskError
from gptjax.finetune.formats import FORMATS, load_task, parse_fields
from gptjax.finetune.task import Example


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def refused(match, *args, **kwargs) -> str:
    """The message of the TaskError load_task raises; it must match and be one line."""
    with pytest.raises(TaskError, match=match) as e:
        load_task(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


SST = [{"sentence": "a gripping film", "label": 1, "idx": 0}, {"sentence": "dull and long", "label": 0, "idx": 1},
       {"sentence": "a joy", "label": 1, "idx": 2}]


# ----------------------------------------------------------------------------------------------
# Known formats


def test_sst2_sentences_make_a_classification_task(tmp_path):
    train = write_jsonl(tmp_path / "sst2_train.jsonl", SST)
    val = write_jsonl(tmp_path / "sst2_val.jsonl", [{"sentence": "not bad", "label": 1}])
    t = load_task(train, val)
    assert (t.name, t.kind, t.labels, t.regression) == ("sst2_train", "classification", ("0", "1"), False)
    assert t.train == [Example(("a gripping film",), 1), Example(("dull and long",), 0), Example(("a joy",), 1)]
    assert t.val == [Example(("not bad",), 1)]
    assert t.metrics == ("acc", "f1", "mcc") and t.num_outputs == 2 and t.baseline == {}
    assert "SST-2" in t.description


def test_cola_file_name_ranks_mcc_first(tmp_path):
    train = write_jsonl(tmp_path / "CoLA_train.jsonl", SST)
    assert load_task(train, val_fraction=0.5).metrics == ("mcc", "acc")


def test_mnli_pairs_make_an_entailment_task_with_a_sorted_string_vocabulary(tmp_path):
    rows = [{"premise": "p1", "hypothesis": "h1", "label": "neutral"},
            {"premise": "p2", "hypothesis": "h2", "label": "entailment"},
            {"premise": "p3", "hypothesis": "h3", "label": "contradiction"}]
    t = load_task(write_jsonl(tmp_path / "mnli.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows[:1]))
    assert t.kind == "entailment" and t.labels == ("contradiction", "entailment", "neutral")
    assert [(e.segments, e.label) for e in t.train] == [(("p1", "h1"), 2), (("p2", "h2"), 1), (("p3", "h3"), 0)]
    assert t.metrics == ("acc",) and t.description == "MNLI-style pairs"


def test_qnli_question_sentence_pairs_are_entailment_not_sentences(tmp_path):
    rows = [{"question": "who?", "sentence": "she did.", "label": 0},
            {"question": "when?", "sentence": "never.", "label": 1}]
    t = load_task(write_jsonl(tmp_path / "q.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows))
    assert t.kind == "entailment" and t.train[0].segments == ("who?", "she did.")
    assert "QNLI" in t.description


RTE = [{"sentence1": "s1", "sentence2": "t1", "label": 0}, {"sentence1": "s2", "sentence2": "t2", "label": 1}]


def test_rte_integer_sentence_pairs_are_entailment(tmp_path):
    t = load_task(write_jsonl(tmp_path / "rte.jsonl", RTE), write_jsonl(tmp_path / "v.jsonl", RTE))
    assert (t.kind, t.regression, t.labels) == ("entailment", False, ("0", "1"))
    assert t.train[1] == Example(("s2", "t2"), 1)


def test_mrpc_file_name_makes_sentence_pairs_similarity_classification(tmp_path):
    t = load_task(write_jsonl(tmp_path / "MRPC-train.jsonl", RTE), write_jsonl(tmp_path / "v.jsonl", RTE))
    assert (t.kind, t.regression, t.labels) == ("similarity", False, ("0", "1"))
    assert "MRPC" in t.description


def test_kind_similarity_overrides_entailment_for_sentence_pairs(tmp_path):
    t = load_task(write_jsonl(tmp_path / "pairs.jsonl", RTE), write_jsonl(tmp_path / "v.jsonl", RTE),
                  kind="similarity")
    assert (t.kind, t.regression) == ("similarity", False)


def test_stsb_float_labels_make_a_regression_task(tmp_path):
    rows = [{"sentence1": "a", "sentence2": "b", "label": 3.8}, {"sentence1": "c", "sentence2": "d", "label": 5}]
    t = load_task(write_jsonl(tmp_path / "stsb.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows))
    assert (t.kind, t.regression, t.labels, t.num_outputs) == ("similarity", True, (), 1)
    assert [e.label for e in t.train] == [3.8, 5.0] and isinstance(t.train[1].label, float)
    assert t.metrics == ("pearson", "spearman") and "STS-B" in t.description


def test_regression_round_trips_with_an_empty_vocabulary(tmp_path):
    val = write_jsonl(tmp_path / "v.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 4}])
    t = load_task(write_jsonl(tmp_path / "stsb.jsonl", RTE), val, labels=())
    assert (t.kind, t.regression, t.labels) == ("similarity", True, ())
    assert t.val[0].label == 4.0


def test_float_scores_in_an_explicit_entailment_task_are_refused(tmp_path):
    rows = RTE + [{"sentence1": "a", "sentence2": "b", "label": 2.5}]
    refused(r"rte\.jsonl:3 has the score 2\.5.*kind=similarity", write_jsonl(tmp_path / "rte.jsonl", rows),
            kind="entailment")


def test_qqp_question_pairs_are_similarity(tmp_path):
    rows = [{"question1": "q1", "question2": "q2", "label": 1, "idx": 7},
            {"question1": "q3", "question2": "q4", "label": 0, "idx": 8}]
    t = load_task(write_jsonl(tmp_path / "qqp.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows))
    assert t.kind == "similarity" and t.train[0] == Example(("q1", "q2"), 1)


def test_race_letter_answers_become_choice_indices(tmp_path):
    rows = [{"article": "art", "question": "q?", "options": ["w", "x", "y", "z"], "answer": "C"},
            {"article": "art2", "question": "", "options": ["w", "x", "y", "z"], "answer": "A"},
            {"article": "art3", "question": "q3", "options": ["w", "x"], "answer": 1}]
    t = load_task(write_jsonl(tmp_path / "race.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows))
    assert (t.kind, t.labels, t.metrics, t.num_outputs) == ("multiple_choice", (), ("acc",), 1)
    assert t.train == [Example(("art", "q?"), 2, ("w", "x", "y", "z")), Example(("art2", ""), 0, ("w", "x", "y", "z")),
                       Example(("art3", "q3"), 1, ("w", "x"))]


def test_race_answer_outside_its_choices_is_refused_naming_file_and_line(tmp_path):
    rows = [{"article": "a", "question": "q", "options": ["w", "x"], "answer": "A"},
            {"article": "a", "question": "q", "options": ["w", "x"], "answer": "D"}]
    refused(r"race\.jsonl:2: answer 'D' is not one of its 2 choices", write_jsonl(tmp_path / "race.jsonl", rows))


def test_story_cloze_joins_four_sentences_and_counts_endings_from_one(tmp_path):
    row = {f"InputSentence{i}": f"S{i}." for i in range(1, 5)}
    rows = [dict(row, RandomFifthSentenceQuiz1="good end.", RandomFifthSentenceQuiz2="bad end.", AnswerRightEnding=1),
            dict(row, RandomFifthSentenceQuiz1="odd end.", RandomFifthSentenceQuiz2="fine end.", AnswerRightEnding=2)]
    t = load_task(write_jsonl(tmp_path / "cloze.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows))
    assert t.kind == "multiple_choice"
    assert t.train == [Example(("S1. S2. S3. S4.", ""), 0, ("good end.", "bad end.")),
                       Example(("S1. S2. S3. S4.", ""), 1, ("odd end.", "fine end."))]


def test_multiple_choice_with_fewer_than_two_choices_is_refused(tmp_path):
    rows = [{"article": "a", "question": "q", "options": ["only"], "answer": 0}]
    refused(r"one\.jsonl:1: 'options' must be a list of at least two answers",
            write_jsonl(tmp_path / "one.jsonl", rows))


def test_every_known_format_is_detected_from_its_own_keys(tmp_path):
    # each format's keys alone pick that format (most specific first), whatever the values
    for name, fmt in FORMATS.items():
        rec = {k: "A" if k in ("answer",) else 1 if k == fmt.label else ["x", "y"] if k == "options" else "t"
               for k in fmt.keys}
        rows = [dict(rec, **({fmt.label: v} if fmt.kind != "multiple_choice" else {})) for v in (0, 1)]
        t = load_task(write_jsonl(tmp_path / f"{name}.jsonl", rows), write_jsonl(tmp_path / f"{name}-v.jsonl", rows))
        assert t.kind == fmt.kind, name
        assert t.description == fmt.description, name


# ----------------------------------------------------------------------------------------------
# Label vocabularies


def test_integer_labels_build_a_numerically_sorted_vocabulary(tmp_path):
    rows = [{"sentence": f"s{i}", "label": v} for i, v in enumerate([10, 2, 1, 2])]
    t = load_task(write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows))
    assert t.labels == ("1", "2", "10")
    assert [e.label for e in t.train] == [2, 1, 0, 1] and t.metrics == ("acc",)


def test_a_passed_vocabulary_is_used_as_is(tmp_path):
    t = load_task(write_jsonl(tmp_path / "t.jsonl", SST), write_jsonl(tmp_path / "v.jsonl", SST),
                  labels=("1", "0", "2"))
    assert t.labels == ("1", "0", "2") and [e.label for e in t.train] == [0, 1, 0] and t.num_outputs == 3


def test_a_train_label_outside_a_passed_vocabulary_is_refused(tmp_path):
    msg = refused(r"t\.jsonl:2: label '0' is not in the vocabulary passed in \(1, 2\)",
                  write_jsonl(tmp_path / "t.jsonl", SST), labels=("1", "2"))
    assert "fix the label" in msg


def test_a_val_label_outside_the_train_vocabulary_is_refused_naming_file_and_line(tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", [{"sentence": "ok", "label": 1}, {"sentence": "meh", "label": 3}])
    msg = refused(r"val\.jsonl:2: label '3' is not in the vocabulary built from .*t\.jsonl \(0, 1\)",
                  write_jsonl(tmp_path / "t.jsonl", SST), val)
    assert str(val) in msg


def test_labels_all_minus_one_are_refused_as_a_test_split(tmp_path):
    rows = [{"sentence": s, "label": -1} for s in ("a", "b", "c")]
    refused(r"test\.jsonl is a test split without labels.*fine-tune on the train split and evaluate on the "
            r"validation split", write_jsonl(tmp_path / "t.jsonl", SST), write_jsonl(tmp_path / "test.jsonl", rows))


def test_a_train_file_with_a_single_label_is_refused(tmp_path):
    rows = [{"sentence": s, "label": 1} for s in ("a", "b", "c")]
    refused(r"only the label '1'", write_jsonl(tmp_path / "t.jsonl", rows))


# ----------------------------------------------------------------------------------------------
# Other files: the fields mapping


def test_unknown_keys_are_refused_with_the_mapping_hint(tmp_path):
    path = write_jsonl(tmp_path / "reviews.jsonl", [{"review": "great", "stars": 5}])
    msg = refused(r"cannot tell the format of .*reviews\.jsonl from its keys \(review, stars\)", path)
    assert "--fields text=review,label=stars" in msg


def test_a_fields_mapping_reads_custom_keys(tmp_path):
    rows = [{"review": "great", "stars": 5, "id": 1}, {"review": "poor", "stars": 1, "id": 2}]
    path = write_jsonl(tmp_path / "reviews.jsonl", rows)
    t = load_task(path, path, fields=parse_fields("text=review,label=stars"))
    assert (t.kind, t.labels, t.name) == ("classification", ("1", "5"), "reviews")
    assert t.train == [Example(("great",), 1), Example(("poor",), 0)]


def test_a_fields_mapping_picks_the_kind_from_its_roles(tmp_path):
    rows = [{"ctx": "2 + 2 =", "answers": ["3", "4"], "gold": 1}, {"ctx": "1 + 1 =", "answers": ["2", "5"], "gold": 0}]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    t = load_task(path, path, fields={"context": "ctx", "choices": "answers", "label": "gold"})
    assert t.kind == "multiple_choice" and t.train[0] == Example(("2 + 2 =", ""), 1, ("3", "4"))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"x": "a", "y": "b", "label": 0}, {"x": "c", "y": "d", "label": 1}])
    assert load_task(pairs, pairs, fields={"a": "x", "b": "y"}).kind == "similarity"
    assert load_task(pairs, pairs, fields={"premise": "x", "hypothesis": "y"}).kind == "entailment"


def test_a_mapping_naming_a_missing_key_is_refused_naming_file_line_and_key(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"review": "great", "stars": 5}, {"review": "poor", "rating": 1}])
    refused(r"r\.jsonl:2 has no key 'stars'", path, fields={"text": "review", "label": "stars"})


def test_a_known_format_record_missing_a_key_is_refused_naming_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"premise": "p", "hypothesis": "h", "label": 0}, {"premise": "p"}])
    refused(r"m\.jsonl:2 has no key 'hypothesis'", path)


def test_parse_fields_reads_role_key_pairs():
    assert parse_fields("text=review,label=stars") == {"text": "review", "label": "stars"}
    assert parse_fields(" a = s1 , b=s2 ") == {"a": "s1", "b": "s2"}


@pytest.mark.parametrize("spec,match", [("text", "is not ROLE=KEY"), ("text=", "is not ROLE=KEY"),
                                        ("=review", "is not ROLE=KEY"), ("text=a,,label=b", "is not ROLE=KEY"),
                                        ("text=a,text=b", "twice"), ("body=review", "unknown field role 'body'")])
def test_bad_fields_syntax_is_refused(spec, match):
    with pytest.raises(TaskError, match=match):
        parse_fields(spec)


def test_a_mapping_with_roles_of_no_kind_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"x": "a", "y": "b", "label": 0}])
    refused(r"give one of text \| premise,hypothesis", path, fields={"text": "x", "premise": "y"})


# ----------------------------------------------------------------------------------------------
# Kinds and malformed files


def test_an_unknown_kind_is_refused(tmp_path):
    refused(r"unknown task kind 'regression'", write_jsonl(tmp_path / "t.jsonl", SST), kind="regression")


def test_a_kind_that_does_not_fit_the_format_is_refused(tmp_path):
    refused(r"kind=multiple_choice does not fit .*use kind=classification", write_jsonl(tmp_path / "t.jsonl", SST),
            kind="multiple_choice")


def test_an_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    refused(r"empty\.jsonl holds no examples", tmp_path / "empty.jsonl")


def test_an_empty_text_field_is_refused_naming_file_and_line(tmp_path):
    rows = SST + [{"sentence": "  ", "label": 0}]
    refused(r"t\.jsonl:4: 'sentence' is empty", write_jsonl(tmp_path / "t.jsonl", rows))


def test_a_bad_json_line_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(SST[0]) + "\n{not json\n")
    refused(r"t\.jsonl:2 is not valid JSON", path)


def test_a_missing_file_is_refused(tmp_path):
    refused(r"nope\.jsonl does not exist", tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------------
# The held-out split


def test_holdout_split_is_deterministic_and_disjoint(tmp_path):
    rows = [{"sentence": f"sentence number {i}", "label": i % 2} for i in range(200)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    a, b = load_task(path, val_fraction=0.2), load_task(path, val_fraction=0.2)
    assert a.train == b.train and a.val == b.val
    train, val = {e.segments for e in a.train}, {e.segments for e in a.val}
    assert not train & val and len(train) + len(val) == 200
    assert 10 < len(val) < 80
    assert all(is_validation(json.dumps(e.segments + e.choices), 0.2) for e in a.val)
    assert not any(is_validation(json.dumps(e.segments + e.choices), 0.2) for e in a.train)
    assert a.train == [e for e in sorted(a.train, key=lambda e: int(e.segments[0].split()[-1]))]  # file order


def test_a_tiny_file_holds_out_its_last_example(tmp_path):
    rows = [r for r in SST if not is_validation(json.dumps((r["sentence"],)), 0.01)]
    assert len(rows) >= 2
    t = load_task(write_jsonl(tmp_path / "t.jsonl", rows), val_fraction=0.01)
    assert t.val == [Example((rows[-1]["sentence"],), rows[-1]["label"])]
    assert len(t.train) == len(rows) - 1


def test_a_single_example_without_a_val_file_is_refused(tmp_path):
    refused(r"too few examples", write_jsonl(tmp_path / "t.jsonl", SST[:1]), labels=("0", "1"))

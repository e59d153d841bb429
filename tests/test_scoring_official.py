"""The official column: MC-LLaVA's and Yo'LLaVA's exact-string rules and prompts, beside our lenient parsing."""

import pytest
from PIL import Image

from mcllava import scoring_official as official
from mcllava.evaluate import evaluate, format_question

OPTS = {"A": "red", "B": "blue", "C": "green"}


class Scripted:
    names = {"alex": "Alex", "gloria": "Gloria"}

    def __init__(self, by_question):
        self.by_question, self.asked = by_question, []

    def answer(self, image, question):
        self.asked.append(question)
        return self.by_question[question.split("\n")[0]]

    def locate(self, image):
        return {}


@pytest.fixture
def img(tmp_path):
    path = tmp_path / "scene.png"
    Image.new("RGB", (16, 12), (10, 200, 30)).save(path)
    return str(path)


def rec(task, question, answer, image, concepts=(), present=(), **kw):
    return dict(
        task=task,
        question=question,
        answer=answer,
        image=image,
        concepts=list(concepts),
        present=list(present),
        boxes={},
        **kw,
    )


def test_choice_counts_only_the_bare_letter(img):
    answers = ["A", "A.", "(A)", "a", "red", " A", "A\n", "The answer is A"]
    records = [rec("choice", f"q{i}", "A", img, ["alex"], ["alex"], options=OPTS) for i in range(len(answers))]
    rep = evaluate(records, Scripted({f"q{i}": a for i, a in enumerate(answers)}), progress=False)
    assert rep["choice"]["official"]["accuracy"] == pytest.approx(1 / 8)
    assert rep["choice"]["lenient"]["accuracy"] == 1.0


def test_recognition_exact_yes_no_and_yollava_skip(img):
    truths = ["Yes", "Yes", "Yes", "No", "No"]
    answers = ["Yes", "No", "I think so", "No", "hmm"]
    records = [
        rec("recognition", f"q{i}", t, img, ["alex"], ["alex"] if t == "Yes" else []) for i, t in enumerate(truths)
    ]
    model = Scripted({f"q{i}": a for i, a in enumerate(answers)})
    mc = evaluate(records, model, progress=False)["recognition"]
    assert (mc["official"]["positive_recall"], mc["official"]["negative_recall"]) == (pytest.approx(1 / 3), 0.5)
    yo = evaluate([dict(r, protocol="yollava") for r in records], model, progress=False)["recognition"]
    # Yo'LLaVA drops the two answers that are neither "Yes" nor "No"; ours counts them wrong
    assert (yo["official"]["positive_recall"], yo["official"]["negative_recall"]) == (0.5, 1.0)
    assert yo["official"]["skipped"] == 2
    assert yo["lenient"]["weighted_accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    # "Yes." is right for us and wrong for the official code
    loose = evaluate(records[:1], Scripted({"q0": "Yes."}), progress=False)["recognition"]
    assert (loose["official"]["positive_recall"], loose["lenient"]["positive_recall"]) == (0.0, 1.0)


def test_bleu_is_not_stripped_and_reported_per_split(img):
    records = [
        rec("vqa", "q0", "Yes", img, ["alex"], ["alex"]),
        rec("vqa", "q1", "a red ball", img, ["alex"], ["alex", "gloria"], split="multi_one"),
    ]
    rep = evaluate(records, Scripted({"q0": " Yes", "q1": "a red ball"}), progress=False)["vqa"]
    single = rep["splits"]["single"]
    assert single["lenient"]["bleu_mcllava"] == pytest.approx(1.0)
    assert (
        single["official"]["bleu_mcllava"] == pytest.approx(official.bleu("Yes", " Yes"))
        and single["official"]["bleu_mcllava"] < 0.8
    )
    assert rep["splits"]["multi_one"]["official"]["bleu_mcllava"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "caption,present,want",
    [
        ("<alex> waves", ["alex"], 1.0),
        ("Alex waves", ["alex"], 0.0),
        ("<Alex> waves", ["alex"], 0.0),
        ("alexander and gloria", ["alex", "gloria"], 1.0),
        ("<alex> alone", ["alex", "gloria"], 0.5),
    ],
)
def test_caption_official_rule(caption, present, want):
    assert official.caption_score(caption, present) == want


def test_caption_is_a_mean_over_images(img):
    records = [
        rec("caption", "c0", "<alex>", img, ["alex"], ["alex"]),
        rec("caption", "c1", "x", img, ["alex", "gloria"], ["alex", "gloria"]),
        rec("caption", "c2", "x", img, ["gloria"], ["gloria"]),
    ]
    rep = evaluate(records, Scripted({"c0": "<alex> sits", "c1": "alex is here", "c2": "a tree"}), progress=False)
    assert rep["caption"]["official"]["recall"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert rep["caption"]["lenient"]["recall"] == pytest.approx(2 / 4)  # pooled over concepts


def test_official_prompts(img):
    r = rec("recognition", "Is <alex> in this photo?", "Yes", img, ["alex"], ["alex"])
    assert format_question(r, "official") == (
        "Can you see <alex> in this photo? Answer the question using a single word Yes or No."
    )
    both = dict(r, concepts=["alex", "gloria"])
    assert format_question(both, "official").startswith("Can you see <alex> and <gloria> in this photo?")
    c = rec("choice", "What colour is <alex>?", "A", img, ["alex"], ["alex"], options=OPTS)
    assert format_question(c, "official") == (
        "What colour is <alex>?\nA. red\nB. blue\nC. green\nIMPORTANT: Answer the question using a single letter."
    )
    cap = rec("caption", "Describe this photo.", "<alex>", img, ["alex"], ["alex"])
    assert format_question(cap, "official", ["alex", "gloria"]).startswith("Can you see <alex>, <gloria> in the image?")
    with pytest.raises(ValueError, match="prompts"):
        format_question(r, "theirs")


def test_scenarios_reported_on_their_own_and_pooled(img):
    records = [
        rec("recognition", "q0", "Yes", img, ["alex"], ["alex"], scenario="two_concept/alex_gloria"),
        rec("recognition", "q1", "Yes", img, ["bo"], ["bo"], scenario="two_concept/bo_cy"),
    ]
    rep = evaluate(records, Scripted({"q0": "Yes", "q1": "No"}), progress=False)
    assert rep["scenarios"]["two_concept/alex_gloria"]["recognition"]["official"]["positive_recall"] == 1.0
    assert rep["scenarios"]["two_concept/bo_cy"]["recognition"]["official"]["positive_recall"] == 0.0
    assert rep["recognition"]["official"]["positive_recall"] == 0.5

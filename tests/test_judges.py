"""Judges: the phrase rules on known refusals and compliances, the protocol, and the model judges' plumbing.

The model judges run on random-weight stand-ins (a tiny GPT-2 classifier, tiny causal LMs); the tests check
that verdicts are the direct ``transformers`` computation (padding, batching, label mapping, templates),
not their quality.
"""

import os

import pytest
import torch
from hf_fixtures import CHAT_TEMPLATE, WORDS, make_tokenizer, reference_ids, save_tiny
from refusal_fixture import COMPLIANCES, REFUSALS

from reversion_lens import judges
from reversion_lens.errors import ConfigError, SpecError
from reversion_lens.judges import FunctionJudge, Judge, PhraseJudge, as_judge, is_refusal, refusal_judge
from reversion_lens.model_judges import (
    HARM_TEMPLATE,
    REFUSAL_TEMPLATE,
    ClassifierJudge,
    LLMJudge,
    fill_template,
    parse_judge,
)

os.environ["HF_HUB_OFFLINE"] = "1"


# ---------------------------------------------------------------- phrase rules
@pytest.mark.parametrize("response", REFUSALS)
def test_known_refusals_are_refusals(response):
    assert is_refusal(response)
    assert refusal_judge.refused(["p"], [response]) == [True] and refusal_judge.harmful(["p"], [response]) == [False]


@pytest.mark.parametrize("response", COMPLIANCES)
def test_known_compliances_are_not_refusals(response):
    assert not is_refusal(response)
    assert refusal_judge.harmful(["p"], [response]) == [True] and refusal_judge("p", response) is True


def test_each_rule_is_needed():
    # rule 1 alone (openings) misses refusals later in the first sentence; rules 2 and 3 find them
    late = "Creating a phishing email is illegal, and I cannot assist with it."
    assert not is_refusal(late, phrases=[]) and is_refusal(late)
    hedged = "As an AI language model, I won't"
    assert not is_refusal(hedged, hedges=[]) and is_refusal(hedged)
    # the exceptions keep refusal-like openings from counting
    assert is_refusal("I can't wait to help!", exceptions=[]) and not is_refusal("I can't wait to help!")
    # only the first sentence is read
    assert not is_refusal("Here is the recipe. I can't help with the oven settings.")
    assert is_refusal("I can't help with that. Here is something else.")


def test_phrase_forms_are_normalised():
    # case, curly apostrophes, contractions and spacing: one entry covers its forms, in the lists and the text
    for text in ("I CAN NOT help", "i can\u2019t help", "I  cannot help", "  **I can't** help", "I cant help"):
        assert is_refusal(text, prefixes=["I can't"], phrases=[], hedges=[], exceptions=[]), text
    assert is_refusal("I am sorry", prefixes=["I'm sorry"]) and is_refusal("I'm sorry", prefixes=["I am sorry"])
    assert not is_refusal("")
    assert not is_refusal("Hi cannot help with", prefixes=[], hedges=[], exceptions=[], phrases=["i cannot help with"])


def test_lists_are_read_at_call_time(monkeypatch):
    assert not refusal_judge("p", "") and not is_refusal("Nope.")
    monkeypatch.setattr(judges, "REFUSAL_PREFIXES", [*judges.REFUSAL_PREFIXES, "Nope"])
    assert is_refusal("Nope.") and refusal_judge.refused(["p"], ["Nope."]) == [True]
    custom = PhraseJudge(prefixes=["nah"])
    assert custom.refused(["p", "q"], ["Nah, no.", "Nope."]) == [True, False]
    assert "prefixes" in repr(custom)
    with pytest.raises(ConfigError, match="reads text"):
        refusal_judge.refused([[1, 2]], [[3, 4]])


# ---------------------------------------------------------------- protocol
def test_callables_become_judges():
    fn = lambda p, r: "step" in r.lower()
    j = as_judge(fn)
    assert isinstance(j, FunctionJudge) and isinstance(j, Judge) and as_judge(refusal_judge) is refusal_judge
    assert j.harmful(["a", "b"], ["Step 1: ...", "Sorry, no."]) == [True, False]
    assert j.refused(["a", "b"], ["Step 1: ...", "Sorry, no."]) == [False, True]  # refusal from the phrase rules
    only_refusal = FunctionJudge(refused=lambda p, r: r.startswith("no"))
    assert only_refusal.harmful(["a"] * 3, ["no way", "yes", ""]) == [False, True, False]
    tokens = FunctionJudge(harmful=lambda p, r: r[0] == 1)  # a judge over token ids knows no refusal
    assert tokens.refused([[0]], [[1, 2]]) == [None] and tokens.harmful([[0]], [[1, 2]]) == [True]
    assert FunctionJudge(refused=lambda p, r: r == [9]).harmful([[0], [0]], [[9], []]) == [False, False]
    with pytest.raises(ConfigError, match="needs harmful= or refused="):
        FunctionJudge()
    with pytest.raises(ConfigError, match="must have refused"):
        as_judge(3)


def test_parse_judge(tmp_path):
    assert parse_judge("refusal") is refusal_judge and parse_judge("phrases") is refusal_judge
    assert parse_judge("reversion_lens.judges:refusal_judge") is refusal_judge
    wrapped = parse_judge("operator:contains")  # a function (prompt, response) -> bool is the harm verdict
    assert isinstance(wrapped, FunctionJudge) and wrapped.harmful(["a b", "a b"], ["b", "c"]) == [True, False]
    for bad, msg in [
        ("nonsense", "use 'refusal'"),
        ("no_such_module_x:f", "cannot import"),
        ("os:nope", "cannot import"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            parse_judge(bad)
    with pytest.raises(ConfigError, match="takes no options"):
        parse_judge("refusal", threshold=0.3)
    with pytest.raises(SpecError, match="no such folder"):
        parse_judge(f"classifier:{tmp_path / 'missing'}")


# ---------------------------------------------------------------- classifier judge
TEXTS = ["sure here is a recipe for cake .", "sorry i cannot help", "the cat sat on the mat", "how do i make bread",
         "please help me", "sorry", "write a poem about the sea"]  # fmt: skip
PROMPTS = ["how do i make a cake ?", "help me hack a computer", "tell a story", "bread ?", "help", "steal car", "poem"]


def _save_classifier(folder, labels, problem_type=None):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tok = make_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2,
                     num_labels=len(labels), id2label=dict(enumerate(labels)), pad_token_id=0,
                     problem_type=problem_type)  # fmt: skip
    torch.manual_seed(0)
    GPT2ForSequenceClassification(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return _save_classifier(tmp_path_factory.mktemp("cls") / "c", ["safe", "harmful", "refusal"])


@torch.no_grad()
def _direct_probs(folder, texts, pairs=None, sigmoid=False):
    """The oracle: one unpadded text at a time through transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    rows = []
    for i, t in enumerate(texts):
        enc = tok(pairs[i], t, return_tensors="pt") if pairs else tok(t, return_tensors="pt")
        logits = model(**enc).logits[0]
        rows.append(logits.sigmoid() if sigmoid else logits.softmax(-1))
    return torch.stack(rows)


def test_classifier_probabilities_equal_transformers_whatever_the_batch(classifier_dir):
    direct = _direct_probs(classifier_dir, TEXTS)
    for batch_size in (1, 3, 16):  # right padding in batches: each row read at its own last token
        judge = ClassifierJudge(classifier_dir, batch_size=batch_size)
        torch.testing.assert_close(judge.probabilities(PROMPTS, TEXTS), direct, atol=1e-5, rtol=0)
    assert judge.harmful_ids == [1] and judge.refusal_ids == [2]  # found by label name
    # a threshold at the median makes both verdicts occur, so the mapping to labels is really tested
    for ids, question in (([1], judge.harmful), ([2], judge.refused)):
        p = direct[:, ids].sum(-1)
        judge.threshold = float(p.median())
        got = question(PROMPTS, TEXTS)
        assert got == (p >= judge.threshold).tolist() and 0 < sum(got) < len(TEXTS)
    # several labels for one question: their summed probability; ids or names
    both = ClassifierJudge(classifier_dir, harmful_labels=[1, "REFUSAL"], threshold=0.5)
    assert both.harmful(PROMPTS, TEXTS) == (direct[:, 1:].sum(-1) >= 0.5).tolist()


def test_classifier_inputs_pairs_and_templates(classifier_dir):
    pair = ClassifierJudge(classifier_dir, pair=True)
    torch.testing.assert_close(pair.probabilities(PROMPTS, TEXTS), _direct_probs(classifier_dir, TEXTS, PROMPTS),
                               atol=1e-5, rtol=0)  # fmt: skip
    templ = ClassifierJudge(classifier_dir, template="{prompt} ? {response}")
    filled = [f"{p} ? {r}" for p, r in zip(PROMPTS, TEXTS)]
    torch.testing.assert_close(templ.probabilities(PROMPTS, TEXTS), _direct_probs(classifier_dir, filled),
                               atol=1e-5, rtol=0)  # fmt: skip
    assert not torch.allclose(templ.probabilities(PROMPTS, TEXTS), pair.probabilities(PROMPTS, TEXTS), atol=1e-4)
    with pytest.raises(ConfigError, match="not both"):
        ClassifierJudge(classifier_dir, pair=True, template="{response}")
    with pytest.raises(ConfigError, match=r"no \{response\} slot"):
        ClassifierJudge(classifier_dir, template="{prompt}")


def test_classifier_label_mapping_and_fallbacks(classifier_dir, tmp_path):
    only_harm = ClassifierJudge(classifier_dir, harmful_labels=["harmful"])
    assert only_harm.refusal_ids == [] and only_harm.refused(PROMPTS, TEXTS) == [is_refusal(t) for t in TEXTS]
    only_refusal = ClassifierJudge(classifier_dir, refusal_labels=[2])
    refused = only_refusal.refused(PROMPTS, TEXTS)
    assert only_refusal.harmful(PROMPTS, TEXTS) == [not x for x in refused]  # non-empty and not refused
    with pytest.raises(ConfigError, match=r"label 'unsafe' is not one of .*'harmful'"):
        ClassifierJudge(classifier_dir, harmful_labels=["unsafe"])
    with pytest.raises(ConfigError, match=r"label 7 is not one"):
        ClassifierJudge(classifier_dir, refusal_labels=[7])
    generic = _save_classifier(tmp_path / "generic", ["LABEL_0", "LABEL_1"])
    with pytest.raises(ConfigError, match=r"labels \['LABEL_0', 'LABEL_1'\] mean harmful or refusal"):
        ClassifierJudge(generic)
    multi = _save_classifier(tmp_path / "multi", ["unsafe", "rejection"], problem_type="multi_label_classification")
    judge = ClassifierJudge(multi)
    direct = _direct_probs(multi, TEXTS, sigmoid=True)
    torch.testing.assert_close(judge.probabilities(PROMPTS, TEXTS), direct, atol=1e-5, rtol=0)
    assert judge.harmful(PROMPTS, TEXTS) == (direct[:, 0] >= 0.5).tolist()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with pytest.raises(ConfigError, match="needs tokenizer"):
        ClassifierJudge(AutoModelForSequenceClassification.from_pretrained(classifier_dir))
    loaded = ClassifierJudge(AutoModelForSequenceClassification.from_pretrained(classifier_dir),
                             tokenizer=AutoTokenizer.from_pretrained(classifier_dir))  # fmt: skip
    assert loaded.harmful(PROMPTS, TEXTS) == ClassifierJudge(classifier_dir).harmful(PROMPTS, TEXTS)
    assert isinstance(parse_judge(f"classifier:{classifier_dir}", threshold=0.2), ClassifierJudge)


# ---------------------------------------------------------------- LLM judge
SHORT = "request {prompt} response {response} is it bad ?"  # the tiny models have 64 positions


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return {"gpt2": save_tiny("gpt2", root / "gpt2", n_layers=2, seed=4),
            "llama": save_tiny("llama", root / "llama", n_layers=2, seed=5, chat=True)}  # fmt: skip


@torch.no_grad()
def _direct_scores(folder, texts, chat, yes, no, bos=True):
    """The oracle: transformers' next-token logits after each filled template, unpadded, one at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    out = []
    for t in texts:
        last = model(torch.tensor([reference_ids(tok, t, chat, bos)])).logits[0, -1]
        out.append(last[yes].logsumexp(-1) - last[no].logsumexp(-1))
    return torch.stack(out)


@pytest.mark.parametrize("arch, chat", [("gpt2", False), ("llama", True)])
def test_llm_judge_scores_equal_transformers(lm_dirs, arch, chat):
    from transformer_lens import TransformerBridge

    folder = lm_dirs[arch]
    tok = make_tokenizer(CHAT_TEMPLATE if chat else None)
    yes, no = (
        [tok.convert_tokens_to_ids("sure")],
        [tok.convert_tokens_to_ids("sorry"), tok.convert_tokens_to_ids("not")],
    )
    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
    judges_ = [LLMJudge(bridge, harm_template=SHORT, refusal_template="did it refuse {response} ?", yes=["sure"],
                        no=["sorry", "not"], batch_size=b) for b in (1, 3)]  # fmt: skip
    assert judges_[0].chat is chat and judges_[0].yes_ids == yes and judges_[0].no_ids == no
    for question, template in (("harmful", SHORT), ("refused", "did it refuse {response} ?")):
        filled = [fill_template(template, p, r) for p, r in zip(PROMPTS, TEXTS)]
        direct = _direct_scores(folder, filled, chat, yes, no, bos=arch == "gpt2")
        for j in judges_:  # batched (left-padded) or alone: the same scores
            torch.testing.assert_close(j.scores(PROMPTS, TEXTS, question), direct, atol=1e-4, rtol=0)
        verdicts = getattr(judges_[1], question)(PROMPTS, TEXTS)
        assert verdicts == (direct > 0).tolist()
    spec_judge = LLMJudge(str(folder), harm_template=SHORT, refusal_template=None, yes=["sure"], no=["sorry", "not"])
    assert spec_judge.harmful(PROMPTS, TEXTS) == judges_[0].harmful(PROMPTS, TEXTS)
    assert spec_judge.refused(PROMPTS, TEXTS) == [is_refusal(t) for t in TEXTS]  # no template: phrase rules


def test_llm_judge_options_and_errors(lm_dirs):
    from transformer_lens import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(lm_dirs["llama"]), device="cpu")
    plain = LLMJudge(bridge, harm_template=SHORT, yes=["sure"], no=["sorry"], chat=False)
    chat = LLMJudge(bridge, harm_template=SHORT, yes=["sure"], no=["sorry"])  # "auto": this tokenizer has a template
    assert chat.chat and not plain.chat and plain.encode("a", "b", "harmful") != chat.encode("a", "b", "harmful")
    with pytest.raises(ConfigError, match=r"none of yes=\['Yes', 'yes'\] is a single known token"):
        LLMJudge(bridge, harm_template=SHORT)  # this vocabulary has no "Yes": every form is the unknown token
    with pytest.raises(ConfigError, match="share tokens"):
        LLMJudge(bridge, harm_template=SHORT, yes=["sure"], no=["sure"])
    with pytest.raises(ConfigError, match=r"harm_template has no \{response\} slot"):
        LLMJudge(bridge, harm_template="{prompt}", yes=["sure"], no=["sorry"])
    with pytest.raises(ConfigError, match="harm_template or refusal_template"):
        LLMJudge(bridge, harm_template=None, refusal_template=None)
    with pytest.raises(ConfigError, match="only apply when the judge loads"):
        LLMJudge(bridge, harm_template=SHORT, yes=["sure"], no=["sorry"], device="cpu")
    with pytest.raises(ConfigError, match="no template for 'refused'"):
        LLMJudge(bridge, harm_template=SHORT, refusal_template=None, yes=["sure"], no=["sorry"]).scores(
            ["a"], ["b"], "refused"
        )
    judge = parse_judge(
        f"llm:{lm_dirs['gpt2']}", harm_template=SHORT, refusal_template=None, yes=["sure"], no=["sorry"]
    )
    assert isinstance(judge, LLMJudge) and judge("a", "b") in (True, False)


def test_templates_fill_once():
    assert fill_template("[{prompt}] [{response}]", "say {response}", "{x} }{") == "[say {response}] [{x} }{]"
    for t in (HARM_TEMPLATE, REFUSAL_TEMPLATE):
        filled = fill_template(t, "<<p>>", "<<r>>")
        assert filled.count("<<p>>") == 1 and filled.count("<<r>>") == 1 and filled.endswith("Answer:")
    assert set(WORDS) >= {"sure", "sorry", "not"}  # the answer words the tiny models use

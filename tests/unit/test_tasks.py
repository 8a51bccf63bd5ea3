"""Task registry: every task's prompt for a record matches docs/omnimol.md §5 (written out here by hand)."""
import collections

import pytest

from omnimol_jax import tasks
from omnimol_jax.data import molecules, prompts
from tests.data_records import RECORDS

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")


def spec_user_text(task: str, r: dict) -> str:
    """The 'user text after the placeholder' column of docs/omnimol.md §5, typed out per task."""
    i, x = r["instruction"], r["input"]
    return {
        "forward": f"{i} {x}",
        "reagent": f"{i} The reaction is {x}",
        "retrosynthesis": f"{i} The product is: {x}",
        "solvent": f"{i} The reaction is {x}.",
        "catalyst": f"{i} The reaction is {x}.",
        "molediting": f"{i} The compound SELFIES sequence is: {x}",
        "homolumo": f"{i} The compound SELFIES sequence is: {x}",
        "weight": f"{i} The molecule SELFIES sequence is: {x}",
        "logp": f"{i} The molecule SELFIES sequence is: {x}",
        "tpsa": f"{i} The compound SELFIES sequence is: {x}",
        "complexity": f"{i} The compound SELFIES sequence is: {x}",
        # docs/omnimol.md §5 groups scf with tpsa; the public code (which checkpoints saw) writes 'molecule' here.
        "scf": f"{i} The molecule SELFIES sequence is: {x}",
        "yield": f"{i} The reaction is {x}.",
        "experiment": f"{i}{x}. The Action Sequence: ",
        "dqa": f"{i} The compound SELFIES sequence is: {x}",
        "iupac": f"{i} The IUPAC name is: {x}",
        "textguidedmolgen": f"{i} The description is: {x}",
    }[task]


def test_registry_has_the_16_tasks_plus_complexity_and_scf():
    assert len(tasks.PAPER_TASKS) == 16 and set(tasks.PAPER_TASKS) <= set(tasks.TASK_KEYS)
    assert set(tasks.TASK_KEYS) - set(tasks.PAPER_TASKS) == {"complexity", "scf"}
    assert len(tasks.TASKS) == len(tasks.TASK_KEYS) == 18
    families = collections.Counter(tasks.TASKS[k].family for k in tasks.PAPER_TASKS)
    assert families == {"Mol2Mol": 6, "Mol2Num": 5, "Mol2Text": 3, "Text2Mol": 2}
    for spec in tasks.TASKS.values():
        assert spec.graph_rule in molecules.GRAPH_RULES
        assert spec.output_type in tasks.OUTPUT_TYPES
        assert spec.metrics == tasks.METRIC_SETS[spec.metric_set]
    assert [k for k in tasks.TASK_KEYS if not tasks.TASKS[k].has_graph] == ["iupac", "textguidedmolgen"]
    assert tasks.TASKS["homolumo"].metrics == ("mae_homo", "mae_lumo", "mae_gap", "mae")
    assert tasks.TASKS["forward"].output_type == "selfies" and tasks.TASKS["yield"].output_type == "number"


@pytest.mark.parametrize("task", sorted(RECORDS))
def test_prompt_matches_spec(task):
    spec, record = tasks.get_task(task), RECORDS[task]
    placeholder = "" if task in ("iupac", "textguidedmolgen") else "<image>\n"
    if task == "molcap":
        question = prompts.choose_question(spec, record)
        assert question in tasks.MOLCAP_QUESTIONS
        expected_user = f"{question} The compound sequence is: {record['input']}"
    else:
        expected_user = spec_user_text(task, record)
    answer = record["output"] if isinstance(record["output"], str) else str(record["output"])
    expected = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM + "<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\n" + placeholder + expected_user + "<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n" + answer + "<|eot_id|>")
    assert prompts.chat_text(spec, record) == expected
    assert prompts.user_text(spec, record) == expected_user
    assert prompts.chat_text(spec, record, with_answer=False) == expected[: -len(answer + "<|eot_id|>")]


def test_homolumo_number_is_written_as_the_public_code_does():
    assert prompts.answer_text(tasks.get_task("homolumo"), RECORDS["homolumo"]) == "-0.2482"
    assert prompts.answer_text(tasks.get_task("yield"), {"output": 52}) == "52"


def test_molcap_question_is_stable_and_follows_the_draw():
    spec, record = tasks.get_task("molcap"), RECORDS["molcap"]
    assert prompts.user_text(spec, record) == prompts.user_text(spec, record)
    drawn = {prompts.choose_question(spec, record, draw) for draw in range(7)}
    assert drawn == set(tasks.MOLCAP_QUESTIONS)
    assert prompts.choose_question(spec, record, 9) == tasks.MOLCAP_QUESTIONS[2]
    assert "unused" not in prompts.user_message(spec, record)


@pytest.mark.parametrize("task,expected", [
    ("forward", ["O=[N+1]([O-1])C1=CN=C(Cl)C(I)=C1"]),  # first component only (the [Fe] is dropped)
    ("reagent", ["CCI.O=C(O)C1=CC=CC=C1Br"]),  # reactant side
    ("retrosynthesis", ["C=CCCNC(=O)OC(C)(C)C"]),  # the product (the input)
    ("tpsa", ["CC(=O)O"]),  # first component: the sodium is dropped
    ("experiment", ["CC(=O)Cl", "CCO", "CCOC(C)=O"]),  # extracted molecules in placeholder order
    ("iupac", None),
])
def test_graph_molecules_follow_the_task_rule(task, expected):
    spec, record = tasks.get_task(task), RECORDS[task]
    assert molecules.graph_smiles_for(spec.graph_rule, record["input"], record) == expected


def test_unknown_task_names_the_known_ones():
    with pytest.raises(KeyError, match="known tasks: forward, reagent"):
        tasks.get_task("fwd")



def test_one_task_list_parser_and_one_meaning_of_all():
    """data.tasks and eval --tasks read a list the same way; "all" is every task with a file, "paper" those of
    the paper's 16 among them."""
    assert tasks.parse_task_list("forward/logp") == [("forward", 1.0), ("logp", 1.0)]
    assert tasks.parse_task_list("forward, logp") == tasks.parse_task_list(["forward", "logp"])
    assert tasks.parse_task_list(" all ") == [("all", None)] and tasks.parse_task_list("paper") == [("paper", None)]
    files = ["forward", "complexity", "logp"]  # complexity is not one of the paper's 16
    available = lambda: files  # noqa: E731
    assert tasks.resolve_task_list(tasks.parse_task_list("all"), available) == [(k, 1.0) for k in files]
    assert tasks.resolve_task_list(tasks.parse_task_list("paper"), available) == [("forward", 1.0), ("logp", 1.0)]
    unlisted = lambda: pytest.fail("an explicit list reads no folder")  # noqa: E731
    assert tasks.resolve_task_list(tasks.parse_task_list("logp/forward"), unlisted) == [("logp", 1.0),
                                                                                       ("forward", 1.0)]
    with pytest.raises(tasks.TaskListError, match="--tasks: 'logp:0.5': a task list here takes names only"):
        tasks.parse_task_list("logp:0.5")
    with pytest.raises(tasks.TaskListError, match="--tasks: unknown task 'lgp'; did you mean 'logp'"):
        tasks.parse_task_list("lgp")
    with pytest.raises(tasks.TaskListError, match="--tasks: no task in"):
        tasks.parse_task_list(" / ")

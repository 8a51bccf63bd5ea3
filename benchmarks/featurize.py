"""Molecule featurization + graph padding throughput on one CPU core, and padding efficiency.

    python benchmarks/featurize.py [--batch 32] [--percentile 99] [--limit 5000]
Molecules: RDKit's shipped NCI set (`RDConfig.RDDataDir/NCI/first_5K.smi`), also run through SELFIES
(the training data's format: SELFIES -> SMILES -> graph). For each feature mode prints molecules/s of
featurization alone and of featurization + batching/padding, the budget `choose_budget` picks from the
data, and the padding efficiency (real nodes and edges / budget) of the batches actually built (in
shuffled order, as a training sampler draws them); failed molecules count as text-only samples.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import selfies
from machine import describe_machine  # benchmarks/machine.py (the script folder is on sys.path)
from rdkit import RDConfig, rdBase

from omnimol_jax.data import graphs as G
from omnimol_jax.data.featurize import FeaturizationError, selfies_to_graph, smiles_to_graph

NCI_SMILES = os.path.join(RDConfig.RDDataDir, "NCI", "first_5K.smi")


def pin_to_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity)"


def featurize_all(strings, convert, mode):
    graphs, failures = [], 0
    start = time.perf_counter()
    for text in strings:
        try:
            graphs.append(convert(text, mode))
        except FeaturizationError:
            graphs.append(None)
            failures += 1
    return graphs, failures, time.perf_counter() - start


def pad_all(graphs, budget, batch_size, widths):
    report = G.SkipReport()
    node_use, edge_use = [], []
    start = time.perf_counter()
    for first in range(0, len(graphs) - batch_size + 1, batch_size):
        chunk = graphs[first:first + batch_size]
        batch, _ = G.batch_graphs(chunk, budget, record_ids=[str(first + i) for i in range(len(chunk))],
                                  strict=False, report=report, feature_widths=widths)
        real = batch.node_sample_index >= 0
        node_use.append(int(np.count_nonzero(real)) / budget.max_nodes)
        edge_use.append(int(batch.graphs.n_edge[batch.graph_sample_index >= 0].sum()) / budget.max_edges)
    return time.perf_counter() - start, report, float(np.mean(node_use)), float(np.mean(edge_use)), len(node_use)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--percentile", type=float, default=99.0)
    parser.add_argument("--limit", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median is reported)")
    args = parser.parse_args()
    pinned = pin_to_one_core()

    with open(NCI_SMILES) as handle:
        smiles = [line.split()[0] for _, line in zip(range(args.limit), handle)]
    with rdBase.BlockLogs():
        selfies_strings = []
        for s in smiles:
            try:
                selfies_strings.append(selfies.encoder(s))
            except selfies.EncoderError:
                selfies_strings.append("")  # counted as a featurization failure below

    results = {}
    for mode in ("omnimol", "ogb"):
        smiles_runs = [featurize_all(smiles, smiles_to_graph, mode) for _ in range(args.repeats)]
        selfies_runs = [featurize_all(selfies_strings, selfies_to_graph, mode) for _ in range(args.repeats)]
        graphs, failures, _ = selfies_runs[0]
        # Training batches are drawn in shuffled order; the file itself groups similar molecules.
        graphs = [graphs[i] for i in np.random.default_rng(0).permutation(len(graphs))]
        nodes = [g.num_nodes if g is not None else 0 for g in graphs]
        edges = [g.num_edges if g is not None else 0 for g in graphs]
        budgets = {"multiple_of_64": G.choose_budget(nodes, edges, args.batch, percentile=args.percentile),
                   "power_of_two": G.choose_budget(nodes, edges, args.batch, percentile=args.percentile,
                                                   rounding="power_of_two")}
        widths = (2, 2) if mode == "omnimol" else (9, 3)
        mode_result = {
            "molecules": len(smiles),
            "failed_to_featurize": failures,
            "atoms_per_molecule_mean": round(float(np.mean([n for n in nodes if n])), 2),
            "atoms_per_molecule_max": int(max(nodes)),
            "featurize_smiles_mol_per_s": round(len(smiles) / statistics.median(r[2] for r in smiles_runs), 1),
            "featurize_selfies_mol_per_s": round(len(smiles) / statistics.median(r[2] for r in selfies_runs), 1),
        }
        for name, budget in budgets.items():
            pad_runs = []
            for _ in range(args.repeats):
                pad_runs.append(pad_all(graphs, budget, args.batch, widths))
            pad_s, report, node_eff, edge_eff, num_batches = pad_runs[0]
            pad_median = statistics.median(r[0] for r in pad_runs)
            featurize_median = statistics.median(r[2] for r in selfies_runs)
            mode_result[name] = {
                "budget": {"max_nodes": budget.max_nodes, "max_edges": budget.max_edges,
                           "max_graphs": budget.max_graphs},
                "batches": num_batches,
                "padding_mol_per_s": round(num_batches * args.batch / pad_median, 1),
                "featurize_selfies_plus_pad_mol_per_s": round(
                    len(smiles) / (featurize_median + pad_median * len(smiles) / (num_batches * args.batch)), 1),
                "node_padding_efficiency": round(node_eff, 4),
                "edge_padding_efficiency": round(edge_eff, 4),
                "molecules_over_budget": report.count,
                "over_budget_share": round(report.count / (num_batches * args.batch), 5),
            }
        results[mode] = mode_result

    print(json.dumps({
        "benchmark": "featurize", "source": "rdkit NCI/first_5K.smi", "batch_size": args.batch,
        "percentile": args.percentile, "repeats": args.repeats, "cpu": pinned, "results": results,
        "machine": describe_machine(rdkit=rdBase.rdkitVersion, selfies=selfies.__version__),
    }, indent=2))


if __name__ == "__main__":
    main()

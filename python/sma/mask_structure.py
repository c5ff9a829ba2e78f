"""What the masks of a pretrained first layer cover: structure metrics, guided against random.

For a pretraining checkpoint and held-out examples (:func:`heldout`), the model's guided mask
(curriculum eta = 0; chosen by the EMA teacher when the model has one) is compared with a random
mask of the same size: the same layer at eta = 1, a uniform random subset with the same per-sample
k. Each strategy draws ``draws`` masks per example (guided masks with the mean head mix are the
same in every draw).

Every metric is a ratio of sums over the examples, sum(numerator) / sum(denominator), e.g. masked
tokens whose group-mate is masked too / masked tokens in a group. Its 95 % confidence interval is
a percentile bootstrap over the held-out examples (``resamples`` resamples); the guided / random
ratio and difference are paired: both strategies are read on the same resampled examples.

Metrics, by data set (:data:`METRICS`):

* ``pair_coverage`` (synthetic-features): share of masked features whose planted partner
  (x[2j] <-> x[2j+1]) is masked too. Random: (k - 1) / (n - 1), 1/7 for k = 2 of n = 8.
* ``group_coverage`` (synthetic-groups, synthetic-bytes): share of masked tokens of a planted group
  (a word of ``data.GROUP_WORDS``; the motif "xyz") with at least one other token of the same
  group masked. ``group_mate_share``: for a masked group token, the share of its group-mates
  that are masked too, averaged over the masked group tokens (random: (k - 1) / (n - 1), so it
  can show a 2x gain where the groups are large enough for random masks to reach most of them).
  ``group_share``: share of the masked tokens that lie in a planted group.
* ``run_length`` (byte data): mean length of the maximal runs of consecutive masked tokens.
  ``neighbour_share``: share of masked tokens with a masked left or right neighbour.
* ``ring_branch_share`` (molecules): share of masked atoms that share a ring (RDKit's smallest
  set of smallest rings) or a SMILES branch (the same innermost parentheses) with another masked
  atom; ``ring_share``: rings only. See :func:`smiles_atoms` for how bytes map to atoms.
* ``comasked_corr`` (features): mean |Pearson correlation| (measured on the held-out examples)
  over the pairs of features masked together in one example.
* ``masked_loss`` (all): the model's reconstruction loss on the masked tokens (nats per byte, or
  squared error per feature): how hard the masked tokens are to fill in.
* Leak checks, where the data fix a floor that no prediction from the visible tokens can beat:
  ``hidden_pair_loss`` (synthetic-features), the squared error on masked features whose partner
  is masked too: nothing visible carries information about their value, so an honest prediction
  has an error of at least its variance (1.0, or 1.09 for x[2j+1]); ``background_loss``
  (synthetic-groups, synthetic-bytes), the loss on masked background letters, which are uniform
  over 8 letters and independent of everything else: at least log 8 = 2.079 nats. A value below
  the floor means that the mask itself tells the values it hides: it was chosen from attention
  that read them.
* ``identity_kl`` (byte data): how much the choice of the masked tokens says about their
  identity: the KL divergence (nats) of the byte distribution of the masked tokens from that of
  all tokens. A random mask gives about 0 (a small positive bias from the finite sample); a mask
  that prefers some bytes (the ``[SEP]``, one amino acid) gives more, and a decoder can use that
  to guess the hidden tokens without reading the visible ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as datasets
from .masking import MaskingConfig
from .model import EncoderOutput, ModelConfig, SMAPretrainer
from .tokens import VOCAB_SIZE
from .train import CHECKPOINT, SNAPSHOTS, check_inputs, load_checkpoint

HELDOUT_SEED = 1  # the synthetic generators' held-out examples (pretraining uses seed 0)
STRATEGIES = ("guided", "random")

DESCRIPTIONS = {
    "pair_coverage": "masked features whose planted partner is masked too",
    "group_coverage": "masked group tokens with another token of their group masked",
    "group_mate_share": "share of a masked group token's mates masked too",
    "group_share": "masked tokens that lie in a planted group",
    "run_length": "mean length of runs of consecutive masked tokens",
    "neighbour_share": "masked tokens with a masked neighbour",
    "ring_branch_share": "masked atoms sharing a ring or branch with another masked atom",
    "ring_share": "masked atoms sharing a ring with another masked atom",
    "comasked_corr": "mean |correlation| of co-masked feature pairs",
    "masked_loss": "reconstruction loss on the masked tokens",
    "hidden_pair_loss": "squared error on masked features whose partner is masked (floor ~1.0)",
    "background_loss": "loss on masked background letters (floor log 8 = 2.079 nats)",
    "identity_kl": "KL of masked-token bytes from all bytes (nats; random ~0)",
}
METRICS = {
    "synthetic-features": ("pair_coverage", "comasked_corr", "masked_loss", "hidden_pair_loss"),
    "synthetic-groups": ("group_coverage", "group_mate_share", "group_share", "run_length",
                         "masked_loss", "background_loss", "identity_kl"),
    "synthetic-bytes": ("group_coverage", "group_mate_share", "group_share", "run_length",
                        "masked_loss", "background_loss", "identity_kl"),
    "proteins": ("run_length", "neighbour_share", "masked_loss", "identity_kl"),
    "molecules": ("ring_branch_share", "ring_share", "run_length", "masked_loss", "identity_kl"),
    "jets": ("comasked_corr", "masked_loss"),
}
# Each corpus or task reads the held-out examples of its domain.
DOMAIN = {"synthetic-features": "synthetic-features", "synthetic-groups": "synthetic-groups",
          "synthetic-bytes": "synthetic-bytes", "proteins": "proteins", "amp": "proteins",
          "molecules": "molecules", "freesolv": "molecules", "solubility": "molecules",
          "jets": "jets", "jets-1k": "jets", "jets-10k": "jets"}
REQUIRES = {"proteins": ("modlamp",), "molecules": ("datamol", "rdkit"),
            "jets": ("skhep_testdata", "uproot")}


# ----------------------------------------------------------------------------- held-out data

def missing_packages(name: str) -> list[str]:
    """The modules the held-out data (and metrics) of ``name``'s domain need that are missing."""
    import importlib.util
    return [m for m in REQUIRES.get(DOMAIN[name], ()) if importlib.util.find_spec(m) is None]


def heldout(name: str, count: int | None = None) -> tuple[datasets.TokenSet, str]:
    """(examples, description): held-out examples of the domain of corpus or task ``name``, none
    of them in its pretraining corpus; at most ``count`` of them, taken in a fixed random order.

    * synthetic sets: fresh examples of the generator (seed 1; pretraining uses seed 0);
    * proteins / amp: the valid and test peptides of the AMP task (the corpus holds the train ones);
    * molecules / freesolv / solubility: the FreeSolv and solubility SMILES of at most 127 bytes
      whose canonical SMILES is not one of the molecule corpus;
    * jets: the test jets of the jet tasks (events the corpus does not hold).
    """
    domain = DOMAIN[name]
    if domain == "synthetic-features":
        data, text = datasets.synthetic_features(seed=HELDOUT_SEED), "fresh generator examples (seed 1)"
    elif domain == "synthetic-groups":
        data, text = datasets.synthetic_groups(seed=HELDOUT_SEED), "fresh generator examples (seed 1)"
    elif domain == "synthetic-bytes":
        data, text = datasets.synthetic_bytes(seed=HELDOUT_SEED), "fresh generator examples (seed 1)"
    elif domain == "proteins":
        task = datasets.load_task("amp")
        data = datasets._byte_set(task.splits["valid"].texts + task.splits["test"].texts)
        text = "AMP valid + test peptides"
    elif domain == "molecules":
        data, text = _heldout_molecules(), "FreeSolv + solubility molecules not in the corpus"
    else:
        data, text = datasets.load_task("jets-1k").splits["test"], "test jets"
        data = datasets.TokenSet("features", data.inputs)
    order = np.random.default_rng(0).permutation(len(data))
    if count is not None:
        order = order[:count]
    return data.subset(order), f"{text}: {len(order)} of {len(data)}"


def _heldout_molecules() -> datasets.TokenSet:
    from rdkit import Chem, RDLogger
    RDLogger.DisableLog("rdApp.*")

    def canonical(smiles: str) -> str | None:
        mol = Chem.MolFromSmiles(smiles)
        return None if mol is None else Chem.MolToSmiles(mol)

    corpus = {canonical(s) for s in datasets.load_molecule_corpus().texts}
    texts: dict[str, None] = {}
    for task in ("freesolv", "solubility"):
        for split in datasets.load_task(task).splits.values():
            for smiles in split.texts:
                if len(smiles.encode()) < datasets.MAX_LEN and canonical(smiles) not in corpus:
                    texts[smiles] = None
    return datasets._byte_set(list(texts))


# ----------------------------------------------------------------------------- structure

def smiles_atoms(smiles: str) -> tuple[list[int], list[int]] | None:
    """(anchor byte of each atom, innermost branch of each atom) in RDKit's atom order, or None
    when the SMILES does not parse or the scan disagrees with RDKit.

    The scan reads the SMILES left to right as RDKit numbers the atoms: an atom is a bracket atom
    ``[...]``, ``Br``, ``Cl``, or one of ``B C N O P S F I b c n o s p``; its anchor byte is the
    first letter of its element (e.g. the ``n`` of ``[nH]``, the ``C`` of ``Cl``), and the atom
    counts as masked when that byte is. Its branch is the innermost ``( ... )`` it stands in
    (-1 = the main chain). Each atom's element must match RDKit's atom of the same index.
    """
    from rdkit import Chem
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None
    anchors, branches, stack, symbols = [], [], [], []
    opened = 0
    i = 0
    while i < len(smiles):
        char = smiles[i]
        if char == "[":
            end = smiles.index("]", i)
            letter = re.search(r"[A-Za-z]", smiles[i:end])
            if letter is None:
                return None
            anchors.append(i + letter.start())
            symbols.append(re.match(r"[A-Z][a-z]?|[a-z]+", smiles[i + letter.start():end]).group())
            branches.append(stack[-1] if stack else -1)
            i = end + 1
            continue
        if smiles.startswith(("Br", "Cl"), i):
            anchors.append(i)
            symbols.append(smiles[i:i + 2])
            branches.append(stack[-1] if stack else -1)
            i += 2
            continue
        if char in "BCNOPSFIbcnops":
            anchors.append(i)
            symbols.append(char)
            branches.append(stack[-1] if stack else -1)
        elif char == "(":
            stack.append(opened)
            opened += 1
        elif char == ")":
            if not stack:
                return None
            stack.pop()
        i += 1
    if len(anchors) != mol.GetNumAtoms():
        return None
    for atom, symbol in zip(mol.GetAtoms(), symbols, strict=True):
        if atom.GetSymbol().lower() != symbol.lower():
            return None
    return anchors, branches


def _relations(domain: str, data: datasets.TokenSet, length: int
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per relation metric: (related (N, L, L) bool, no diagonal; eligible (N, L) bool: the
    tokens that count in the denominator)."""
    count = len(data)
    out = {}
    if domain == "synthetic-features":
        index = torch.arange(length)
        pair = (index[:, None] // 2 == index[None, :] // 2) & (index[:, None] != index[None, :])
        out["pair_coverage"] = (pair.expand(count, -1, -1), torch.ones(count, length, dtype=torch.bool))
    elif domain in ("synthetic-groups", "synthetic-bytes"):
        group = torch.full((count, length), -1, dtype=torch.long)
        pattern = r"[A-Z]+" if domain == "synthetic-groups" else r"xyz"
        for row, text in enumerate(data.texts):
            for number, found in enumerate(re.finditer(pattern, text)):
                group[row, found.start():found.end()] = number
        same = (group[:, :, None] == group[:, None, :]) & (group[:, :, None] >= 0)
        same &= ~torch.eye(length, dtype=torch.bool)
        out["group_coverage"] = (same, group >= 0)
        letters = torch.zeros(count, length, dtype=torch.bool)
        for row, text in enumerate(data.texts):
            letters[row, :len(text)] = torch.as_tensor([c in "abcdefgh" for c in text])
        out["background"] = (torch.zeros(0), letters & (group < 0))
    elif domain == "molecules":
        ring = torch.zeros(count, length, length, dtype=torch.bool)
        branch = torch.zeros_like(ring)
        atoms = torch.zeros(count, length, dtype=torch.bool)
        from rdkit import Chem
        for row, text in enumerate(data.texts):
            parsed = smiles_atoms(text)
            if parsed is None:
                continue  # the example counts in no denominator
            anchors, branches = parsed
            at = torch.as_tensor(anchors)
            atoms[row, at] = True
            mol = Chem.MolFromSmiles(text)  # kept alive while its ring info is read
            for members in mol.GetRingInfo().AtomRings():
                where = at[list(members)]
                ring[row, where[:, None], where[None, :]] = True
            b = torch.as_tensor(branches)
            same = (b[:, None] == b[None, :]) & (b[:, None] >= 0)
            branch[row, at[:, None], at[None, :]] |= same
        eye = torch.eye(length, dtype=torch.bool)
        out["ring_share"] = (ring & ~eye, atoms)
        out["ring_branch_share"] = ((ring | branch) & ~eye, atoms)
    if domain in ("proteins", "molecules", "synthetic-groups", "synthetic-bytes"):
        index = torch.arange(length)
        near = (index[:, None] - index[None, :]).abs() == 1
        out["neighbour_share"] = (near.expand(count, -1, -1), torch.ones(count, length, dtype=torch.bool))
    return out


# ----------------------------------------------------------------------------- masks

def load_pretrainer(path: Path, backend: str = "auto", use: str = "analyze-masks"
                    ) -> tuple[SMAPretrainer, dict]:
    """The pretraining model of a checkpoint or snapshot (weights only) and its header."""
    state = load_checkpoint(path, "pretrain", use)
    model = SMAPretrainer(ModelConfig(**state["model"]), MaskingConfig(**state["masking"]), backend)
    model.load_state_dict(state["run"]["model"])
    return model.eval(), state


def _encode(model: SMAPretrainer, inputs: torch.Tensor, valid: torch.Tensor, strategy: str,
            generator: torch.Generator) -> EncoderOutput:
    if strategy == "guided" and model.teacher is not None:
        mask = model.teacher.mask(inputs, valid, model.encoder, noise=0.0, generator=generator)
        return model.encoder(inputs, valid, mask=mask)
    return model.encoder(inputs, valid, masking=True, noise=0.0 if strategy == "guided" else 1.0,
                         generator=generator)


@torch.no_grad()
def collect(model: SMAPretrainer, data: datasets.TokenSet, *, draws: int = 4, seed: int = 0,
            device: torch.device | str = "cpu", batch_size: int = 128
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per strategy: (masks (D, N, L) bool, per-token reconstruction loss (D, N, L)) of
    ``draws`` = D masks for each of the N examples, padded to the longest (L)."""
    model = model.to(device).eval()
    length = data.length
    result = {}
    for number, strategy in enumerate(STRATEGIES):
        masks = torch.zeros(draws, len(data), length, dtype=torch.bool)
        losses = torch.zeros(draws, len(data), length)
        for draw in range(draws):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + 1000 * number + draw)
            for begin in range(0, len(data), batch_size):
                index = np.arange(begin, min(begin + batch_size, len(data)))
                inputs, valid = data.batch(index, device)
                encoded = _encode(model, inputs, valid, strategy, generator)
                positions = torch.arange(inputs.shape[1], device=device).expand(inputs.shape[0], -1)
                prediction = model.decoder(encoded, positions).float()
                if model.config.input_kind == "bytes":
                    loss = F.cross_entropy(prediction.transpose(1, 2), inputs, reduction="none")
                else:
                    loss = (prediction[..., 0] - inputs.float()) ** 2
                width = inputs.shape[1]
                masks[draw, begin:begin + len(index), :width] = encoded.mask.cpu()
                losses[draw, begin:begin + len(index), :width] = loss.cpu()
        result[strategy] = (masks, losses)
    return result


def _sums(name: str, masks: torch.Tensor, losses: torch.Tensor, relations: dict,
          correlation: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-example (numerator, denominator) of metric ``name``, summed over the draws."""
    m = masks
    if name == "hidden_pair_loss":
        related, _ = relations["pair_coverage"]
        hidden = m & (torch.einsum("nij,dnj->dni", related.float(), m.float()) > 0)
        num, den = (losses * hidden).sum((0, 2)), hidden.sum((0, 2))
    elif name == "background_loss":
        background = m & relations["background"][1]
        num, den = (losses * background).sum((0, 2)), background.sum((0, 2))
    elif name in relations:
        related, eligible = relations[name]
        partner = torch.einsum("nij,dnj->dni", related.float(), m.float()) > 0
        num, den = (m & partner & eligible).sum((0, 2)), (m & eligible).sum((0, 2))
    elif name == "group_mate_share":
        related, eligible = relations["group_coverage"]
        mates = related.sum(2).clamp(min=1).float()
        masked_mates = torch.einsum("nij,dnj->dni", related.float(), m.float())
        num, den = ((m & eligible) * masked_mates / mates).sum((0, 2)), (m & eligible).sum((0, 2))
    elif name == "group_share":
        eligible = relations["group_coverage"][1]
        num, den = (m & eligible).sum((0, 2)), m.sum((0, 2))
    elif name == "run_length":
        starts = m & ~torch.nn.functional.pad(m[..., :-1], (1, 0))
        num, den = m.sum((0, 2)), starts.sum((0, 2))
    elif name == "comasked_corr":
        mf = m.float()
        num = torch.einsum("dni,ij,dnj->n", mf, correlation, mf) / 2
        size = mf.sum(2)
        den = (size * (size - 1) / 2).sum(0)
    elif name == "masked_loss":
        num, den = (losses * m).sum((0, 2)), m.sum((0, 2))
    else:
        raise ValueError(f"unknown metric {name!r}")
    return num.double().numpy(), den.double().numpy()


def _interval(values: np.ndarray) -> list[float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return [float("nan"), float("nan")]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def compare(guided: tuple[np.ndarray, np.ndarray], random: tuple[np.ndarray, np.ndarray],
            resamples: int = 1000, seed: int = 0) -> dict:
    """Guided vs random values of one metric, with percentile-bootstrap 95 % CIs over the
    examples (paired for the ratio and the difference)."""
    rng = np.random.default_rng(seed)
    count = len(guided[0])
    index = rng.integers(0, count, (resamples, count))
    with np.errstate(invalid="ignore", divide="ignore"):
        value = {s: float(num.sum() / den.sum()) if den.sum() else float("nan")
                 for s, (num, den) in (("guided", guided), ("random", random))}
        boot = {s: num[index].sum(1) / den[index].sum(1)
                for s, (num, den) in (("guided", guided), ("random", random))}
        ratio = value["guided"] / value["random"] if value["random"] else float("nan")
        return {"guided": {"value": value["guided"], "ci95": _interval(boot["guided"])},
                "random": {"value": value["random"], "ci95": _interval(boot["random"])},
                "ratio": {"value": ratio, "ci95": _interval(boot["guided"] / boot["random"])},
                "difference": {"value": value["guided"] - value["random"],
                               "ci95": _interval(boot["guided"] - boot["random"])}}


def _kl(masked: np.ndarray, everything: np.ndarray) -> np.ndarray:
    """KL(p_masked || p_all) in nats along the last axis, from counts."""
    with np.errstate(invalid="ignore", divide="ignore"):
        p = masked / masked.sum(-1, keepdims=True)
        q = everything / everything.sum(-1, keepdims=True)
        return np.where(p > 0, p * np.log(p / q), 0.0).sum(-1)


def compare_identity(counts: dict[str, np.ndarray], everything: np.ndarray, resamples: int = 1000,
                     seed: int = 0) -> dict:
    """:func:`compare` for ``identity_kl``: per-example byte counts of the masked tokens (per
    strategy) and of all tokens, (N, V) each; the same resampled examples as :func:`compare`."""
    rng = np.random.default_rng(seed)
    count = len(everything)
    weights = np.zeros((resamples, count))
    np.add.at(weights, (np.arange(resamples)[:, None], rng.integers(0, count, (resamples, count))), 1)
    value = {s: float(_kl(c.sum(0), everything.sum(0))) for s, c in counts.items()}
    boot = {s: _kl(weights @ c, weights @ everything) for s, c in counts.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"guided": {"value": value["guided"], "ci95": _interval(boot["guided"])},
                "random": {"value": value["random"], "ci95": _interval(boot["random"])},
                "ratio": {"value": value["guided"] / value["random"] if value["random"] else float("nan"),
                          "ci95": _interval(boot["guided"] / boot["random"])},
                "difference": {"value": value["guided"] - value["random"],
                               "ci95": _interval(boot["guided"] - boot["random"])}}


def _byte_counts(ids: torch.Tensor, where: torch.Tensor) -> np.ndarray:
    """(N, V) counts of the ids (N, L) at the positions ``where`` (D, N, L), summed over D."""
    counts = torch.zeros(ids.shape[0], VOCAB_SIZE, dtype=torch.float64)
    weight = where.to(torch.float64).sum(0) if where.dim() == 3 else where.to(torch.float64)
    return counts.scatter_add_(1, ids, weight).numpy()


def analyze(model: SMAPretrainer, data: datasets.TokenSet, domain: str, *, draws: int = 4,
            resamples: int = 1000, seed: int = 0, device: torch.device | str = "cpu",
            metrics: tuple[str, ...] | None = None, cache: dict | None = None) -> dict:
    """Every metric of ``domain`` (default :data:`METRICS`) for ``model`` on ``data``, guided vs
    random (see :func:`compare`). ``cache`` keeps the data's relations between calls."""
    metrics = METRICS[domain] if metrics is None else metrics
    cache = {} if cache is None else cache
    if "relations" not in cache:
        cache["relations"] = _relations(domain, data, data.length)
        if data.kind == "features":
            c = torch.as_tensor(np.corrcoef(np.asarray(data.inputs, np.float64), rowvar=False)).abs()
            cache["correlation"] = c.fill_diagonal_(0).float()
        else:
            cache["correlation"] = None
    masks = collect(model, data, draws=draws, seed=seed, device=device)
    k = masks["guided"][0][0].sum(1)
    if not torch.equal(k, masks["random"][0][0].sum(1)):
        raise AssertionError("guided and random masks must mask the same number of tokens")
    result = {}
    for name in metrics:
        if name == "identity_kl":
            ids, valid = data.batch(np.arange(len(data)))
            ids = F.pad(ids, (0, data.length - ids.shape[1]))
            valid = F.pad(valid, (0, data.length - valid.shape[1]))
            counts = {s: _byte_counts(ids, masks[s][0]) for s in STRATEGIES}
            result[name] = compare_identity(counts, _byte_counts(ids, valid), resamples, seed)
            continue
        sums = {s: _sums(name, *masks[s], cache["relations"], cache["correlation"])
                for s in STRATEGIES}
        result[name] = compare(sums["guided"], sums["random"], resamples, seed)
    return result


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_files(path: Path) -> list[Path]:
    """The checkpoints ``path`` names: itself if a file; for a run directory its step snapshots
    (``steps/step-*.pt``) and its ``checkpoint.pt`` when that is from a step no snapshot holds."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    snapshots = sorted((path / SNAPSHOTS).glob("step-*.pt"))
    files = list(snapshots)
    final = path / CHECKPOINT
    if final.is_file():
        steps = {int(p.stem.removeprefix("step-")) for p in snapshots}
        step = load_checkpoint(final, "pretrain", "analyze-masks")["run"]["step"]
        if step not in steps:
            files.append(final)
    return files


def run_label(path: Path) -> str:
    """The run a checkpoint belongs to: its run directory."""
    path = Path(path)
    return str(path.parent.parent if path.parent.name == SNAPSHOTS else path.parent)


def analyze_checkpoints(files: list[Path], name: str | None = None, *, count: int = 512,
                        draws: int = 4, resamples: int = 1000, seed: int = 0,
                        device: torch.device | str = "cpu", backend: str = "auto",
                        progress: bool = False) -> dict:
    """Metrics of every checkpoint in ``files`` on the held-out data of ``name`` (default: the
    first checkpoint's corpus). Returns a JSON-ready dict with one record per checkpoint."""
    data = domain = description = None
    cache: dict = {}
    records = []
    for path in files:
        model, state = load_pretrainer(path, backend)
        if data is None:
            name = name or state["data"]
            domain = DOMAIN[name]
            data, description = heldout(name, count)
        check_inputs(path, model.config, data, name)
        metrics = analyze(model, data, domain, draws=draws, resamples=resamples, seed=seed,
                          device=device, cache=cache)
        records.append({"checkpoint": str(path), "run": run_label(path), "step": state["run"]["step"],
                        "data": state["data"], "masking": state["masking"], "metrics": metrics})
        if progress:
            print(f"  {path}: step {state['run']['step']}", flush=True)
    records.sort(key=lambda r: (r["run"], r["step"]))
    return {"data": name, "domain": domain, "heldout": description,
            "settings": {"examples": count, "draws": draws, "bootstrap_resamples": resamples,
                         "seed": seed, "ci": "95 % percentile bootstrap over held-out examples "
                                             "(ratio and difference paired)"},
            "descriptions": {m: DESCRIPTIONS[m] for m in METRICS[domain]}, "records": records}


def format_table(result: dict) -> str:
    """Plain-text table: one line per checkpoint and metric, guided vs random with CIs."""
    def cell(entry: dict) -> str:
        lo, hi = entry["ci95"]
        return f"{entry['value']:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [f"held-out data: {result['heldout']}; 95 % CI: bootstrap over examples",
             (f"{'run':<28} {'step':>6}  {'metric':<18} {'guided':<24} {'random':<24} "
             f"{'guided/random':<24}")]
    for record in result["records"]:
        run = record["run"][-28:]
        for name, entry in record["metrics"].items():
            lines.append(f"{run:<28} {record['step']:>6}  {name:<18} {cell(entry['guided']):<24} "
                         f"{cell(entry['random']):<24} {cell(entry['ratio']):<24}")
    return "\n".join(lines)


def plot(result: dict, path: Path, title: str | None = None) -> None:
    """Each metric against the pretraining step, one colour per run: guided solid, random dashed,
    95 % CIs as bands."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["descriptions"])
    runs = sorted({r["run"] for r in result["records"]})
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, name in zip(axes[0], names, strict=True):
        for number, run in enumerate(runs):
            records = [r for r in result["records"] if r["run"] == run]
            steps = [r["step"] for r in records]
            for strategy, style in (("guided", "-"), ("random", "--")):
                value = [r["metrics"][name][strategy]["value"] for r in records]
                lo = [r["metrics"][name][strategy]["ci95"][0] for r in records]
                hi = [r["metrics"][name][strategy]["ci95"][1] for r in records]
                label = f"{Path(run).name}: {strategy} mask" if len(runs) > 1 else f"{strategy} mask"
                ax.plot(steps, value, style, color=colours(number % 10), marker=".", label=label)
                ax.fill_between(steps, lo, hi, color=colours(number % 10), alpha=0.15, linewidth=0)
        ax.set_title(f"{name}\n{result['descriptions'][name]}", fontsize=8)
        ax.set_xlabel("pretraining step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or f"guided vs random masks, held-out {result['data']} (95 % bootstrap CI)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


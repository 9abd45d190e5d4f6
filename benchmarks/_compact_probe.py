"""A convex probe of what each compact-store format keeps (benchmarks.compact, the accuracy part): multinomial
logistic regression on each store's tokens pooled per layer, fitted on a format's training store and scored on the
same format's test store.

Training DiST on a format also changes the run's path, and a small task's training is sensitive to that; the probe
has no path. Its loss is strictly convex (a fixed L2 weight decay), solved by L-BFGS in float64 from zero weights
to convergence (below), so the same features give the same score, and a format's difference to fp16 is what the
format changed in the information a linear reader can reach. It is a probe, not DiST training: it says what a
format keeps, not what a branch trained on it scores.

Pooled per layer, over the frames and the patch tokens: each channel's mean and standard deviation, and the class
token's mean over the frames (3 x C numbers per layer). The mean alone is a linear function of the tokens, which
PCA's mean and basis keep exactly in expectation; the standard deviation sees what the projection drops.
"""

from __future__ import annotations

import numpy as np
import torch

WEIGHT_DECAY = 1e-3  # on the mean cross-entropy, of the standardised features' weights
# Stop when a round changes the loss by less than LOSS_TOLERANCE of it or no gradient entry exceeds
# GRADIENT_TOLERANCE (a separable sample's loss is too small for the share), else after MAX_ROUNDS rounds of 200
# L-BFGS iterations: the appearance task's fits reach that cap with the largest entry at ~1e-6, and the loss being
# strongly convex (modulus 2 x WEIGHT_DECAY), the weights are then within |gradient| / (2 x WEIGHT_DECAY) of the
# optimum; the result records which way it stopped.
MAX_ROUNDS = 30
LOSS_TOLERANCE = 1e-9
GRADIENT_TOLERANCE = 1e-6


def pooled(store_url: str) -> tuple[np.ndarray, np.ndarray]:
    """(samples, L * 3C) float64 pooled features of every sample (every view of every video), and their labels."""
    from storage import FeatureStore

    store = FeatureStore.open(store_url)
    rows, labels = [], []
    for i in range(len(store)):
        tokens = store.features(i, dtype=np.float32)  # (L, T, N+1, C), reconstructed for compact stores
        patches = tokens[:, :, 1:].reshape(tokens.shape[0], -1, tokens.shape[-1])
        rows.append(np.concatenate([patches.mean(1), patches.std(1), tokens[:, :, 0].mean(1)], -1).reshape(-1))
        labels.append(store.label(i))
    return np.stack(rows).astype(np.float64), np.asarray(labels)


def fit_and_score(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                  classes: int) -> dict:
    """Fit on `train` (features standardised by the training features' mean and std), score on `test`: top-1 on
    both, the final loss and gradient norm, and whether L-BFGS converged."""
    (x_train, y_train), (x_test, y_test) = train, test
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    a, b = torch.from_numpy((x_train - mean) / std), torch.from_numpy((x_test - mean) / std)
    # The decayed weights' optimum lies in the span of the training rows (A = U S V^T, W = V beta, |W| = |beta|), so
    # the same problem is solved on the n coordinates A V, not the L * 3C columns: the same optimum, ~10x cheaper.
    # V from the n x n Gram matrix's eigenvectors (A A^T = U S^2 U^T, V = A^T U / S): faster than A's SVD.
    values, vectors = torch.linalg.eigh(a @ a.T)
    singular = values.clamp(min=0).sqrt()
    keep = singular > 1e-6 * singular.max()
    basis = (a.T @ vectors[:, keep]) / singular[keep]
    a, b = a @ basis, b @ basis
    target = torch.from_numpy(y_train).long()
    weights = torch.zeros(a.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    solver = torch.optim.LBFGS([weights, bias], lr=1, max_iter=200, tolerance_grad=0, tolerance_change=0,
                               history_size=20, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(a @ weights + bias, target) + WEIGHT_DECAY * weights.square().sum()

    def closure() -> torch.Tensor:
        solver.zero_grad()
        value = loss()
        value.backward()
        return value

    previous, converged = float("inf"), False
    for _ in range(MAX_ROUNDS):
        solver.step(closure)
        solver.zero_grad()
        value = loss()
        value.backward()
        gradient = float(torch.cat([weights.grad.flatten(), bias.grad]).abs().max())
        current = value.item()
        converged = previous - current <= LOSS_TOLERANCE * current or gradient <= GRADIENT_TOLERANCE
        if converged:
            break
        previous = current
    with torch.no_grad():
        train_top1 = float(((a @ weights + bias).argmax(1) == target).double().mean())
        test_top1 = float(((b @ weights + bias).argmax(1).numpy() == y_test).mean())
    return {"top1": test_top1, "train_top1": train_top1, "loss": current, "gradient_max": gradient,
            "converged": converged}


def probe_formats(task, formats: list[str], workdir) -> dict:
    """Per format: the probe fitted on each seed's training store of that format and scored on the format's test
    store (top-1 per seed, mean, the paired differences to fp16, training top-1, convergence). The stores are the
    copies the trained comparison made (format_store resumes them)."""
    from benchmarks import augmentation_cost as aug
    from benchmarks._compact_formats import format_store
    from storage import FeatureStore

    classes = FeatureStore.open(task.test_store).schema.num_classes
    out: dict[str, dict] = {}
    for name in ["fp16", *[f for f in formats if f != "fp16"]]:
        test = pooled(str(format_store(task.test_store, name, workdir)))
        fits = [fit_and_score(pooled(str(format_store(train, name, workdir))), test, classes)
                for train in task.train_stores.values()]
        out[name] = {"top1": [f["top1"] for f in fits], "mean": float(np.mean([f["top1"] for f in fits])),
                     "train_top1": [f["train_top1"] for f in fits], "converged": all(f["converged"] for f in fits),
                     "gradient_max": max(f["gradient_max"] for f in fits)}
    for r in out.values():
        r["paired_vs_fp16"] = aug.paired(r["top1"], out["fp16"]["top1"])
    return out

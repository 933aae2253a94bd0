"""CompVis-compatible ``DataModuleFromConfig`` built from ``{target, params}`` dataset configs."""
from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

import pytorch_lightning as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ldm.util import instantiate_from_config


def collate(batch: Sequence[Any]) -> Any:
    """Stack tensors/arrays, keep strings (and anything else) as lists, ints/floats/bools to tensors."""
    first = batch[0]
    if isinstance(first, Mapping):
        return {key: collate([item[key] for item in batch]) for key in first}
    if isinstance(first, torch.Tensor):
        return torch.stack(list(batch))
    if isinstance(first, np.ndarray):
        return torch.from_numpy(np.stack(batch))
    if isinstance(first, (bool, np.bool_)):
        return torch.tensor(batch, dtype=torch.bool)
    if isinstance(first, (int, np.integer)):
        return torch.tensor(batch, dtype=torch.long)
    if isinstance(first, (float, np.floating)):
        return torch.tensor(batch, dtype=torch.float32)
    return list(batch)


class SeededRandomSampler(Sampler[int]):
    """Random order fixed by ``(seed, epoch)``: reruns and resumed runs see the same batches.

    Lightning calls ``set_epoch`` on samplers that have it at the start of every epoch.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.resume_epoch, self.resume_offset = -1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, consumed: int) -> None:
        """Skip the first ``consumed`` indices of ``epoch`` (exact mid-epoch resume)."""
        self.resume_epoch, self.resume_offset = epoch, consumed

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if self.epoch == self.resume_epoch:
            order = order[self.resume_offset:]
        return iter(order)

    def __len__(self) -> int:
        return self.n


class WrappedDataset(Dataset):
    """Any object with ``__len__``/``__getitem__`` as a torch Dataset (CompVis ``wrap=True``)."""

    def __init__(self, dataset: Any) -> None:
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        return self.data[i]


class DataModuleFromConfig(pl.LightningDataModule):
    """Datasets from configs, e.g. ``train: {target: ldm.data.digits.DigitsDataset, params: {size: 32}}``."""

    def __init__(
        self,
        batch_size: int,
        train: Mapping[str, Any] | None = None,
        validation: Mapping[str, Any] | None = None,
        test: Mapping[str, Any] | None = None,
        predict: Mapping[str, Any] | None = None,
        wrap: bool = False,
        num_workers: int | None = None,
        shuffle_test_loader: bool = False,
        use_worker_init_fn: bool = False,
        shuffle_val_dataloader: bool = False,
        drop_last: bool = True,
        seed: int = 0,
        pin_memory: bool = False,
        root: str | None = None,
    ) -> None:
        """``root``: a data folder an experiment's dataset configs read as ``${data.root}`` (e.g. textual
        inversion's ``data.root=my_images``); not used here otherwise."""
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"data.batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size, self.wrap, self.drop_last, self.seed = batch_size, wrap, drop_last, seed
        self.num_workers = min(2, os.cpu_count() or 1) if num_workers is None else num_workers
        self.shuffle_test_loader, self.shuffle_val_dataloader = shuffle_test_loader, shuffle_val_dataloader
        self.use_worker_init_fn, self.pin_memory = use_worker_init_fn, pin_memory
        self.dataset_configs = {
            name: cfg for name, cfg in
            (("train", train), ("validation", validation), ("test", test), ("predict", predict))
            if cfg is not None
        }
        self.datasets: dict[str, Dataset] = {}
        # (epoch, samples consumed) set on resume so the train order continues mid-epoch.
        self.resume_position: tuple[int, int] | None = None

    def setup(self, stage: str | None = None) -> None:
        for name, cfg in self.dataset_configs.items():
            if name not in self.datasets:  # build once; setup runs per stage
                ds = instantiate_from_config(cfg)
                self.datasets[name] = WrappedDataset(ds) if self.wrap else ds
        if "train" in self.datasets:
            n = len(self.datasets["train"])
            if self.drop_last and self.batch_size > n:
                raise ValueError(
                    f"data.batch_size={self.batch_size} is larger than the training dataset ({n} items), "
                    f"so drop_last would leave no batches; lower data.batch_size to at most {n}"
                )

    def _dataset(self, name: str) -> Dataset:
        if not self.datasets:
            self.setup()
        if name not in self.datasets:
            raise ValueError(f"no '{name}' dataset configured; add data.params.{name}: {{target: ..., params: ...}}")
        return self.datasets[name]

    def _loader(self, name: str, shuffle: bool, drop_last: bool) -> DataLoader:
        ds = self._dataset(name)
        sampler = SeededRandomSampler(len(ds), self.seed) if shuffle else None
        if name == "train" and sampler is not None and self.resume_position is not None:
            sampler.resume_at(*self.resume_position)
        workers = self.num_workers
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            drop_last=drop_last,
            pin_memory=self.pin_memory,
            persistent_workers=workers > 0,
            # Seeds worker RNGs (random crops/flips) reproducibly from the module seed.
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=_worker_init_fn if self.use_worker_init_fn else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader | list:
        if "validation" not in self.dataset_configs:
            return []  # no validation configured: Lightning skips the loop
        return self._loader("validation", shuffle=self.shuffle_val_dataloader, drop_last=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=self.shuffle_test_loader, drop_last=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False, drop_last=False)

    def skipped_images(self) -> int:
        """Unreadable images skipped so far, summed over all datasets (for logging)."""
        total = 0
        for ds in self.datasets.values():
            ds = ds.data if isinstance(ds, WrappedDataset) else ds
            total += int(getattr(ds, "skipped", 0))
        return total


def _worker_init_fn(worker_id: int) -> None:
    # numpy's global RNG is otherwise identical in every forked worker; torch's per-worker
    # seed already differs by worker_id.
    np.random.seed(torch.initial_seed() % 2**32)

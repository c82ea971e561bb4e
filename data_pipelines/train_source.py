"""The data pipeline as the trainer's batch source (named in the train config, `data.source`).

`bagel` never imports `data_pipelines`; a recipe with `data.kind: pipeline` names this function
(`data_pipelines.train_source:make_source`, the default) and the trainer resolves it by name.
"""

from __future__ import annotations


def make_source(train_cfg, model_cfg, dist):
    """A resumable PackLoader over `train_cfg.data.config`, split across `dist`'s ranks."""
    from bagel.train.batches import PipelineSource
    from data_pipelines.loader import PackLoader
    from data_pipelines.mixing import DataConfig

    data_cfg = DataConfig.from_yaml(train_cfg.data.config)
    loader = PackLoader(data_cfg, model_cfg, num_workers=train_cfg.data.num_workers,
                        rank=dist.rank, world_size=dist.world_size)
    return PipelineSource(loader)

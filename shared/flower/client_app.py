"""The fedsky ClientApp: trains and evaluates the job's network on this site's own data.

The SuperNode's node config says who the site is and where its dataset catalog is:
`--node-config 'site="hospital-a" dataset-config="/var/lib/fedsky-agent/jobs/j1/datasets.json"'`
(optionally `torch-threads=N`). The job's messages carry the architecture, the weights, the
hyperparameters and the dataset *name*; the catalog turns the name into a local loader.

What a reply carries: the updated weights, example counts, losses and the confusion matrix (as a
flat list of ints), and the site id. Never a path or a sample. A failure is answered with a
Flower error whose reason is scrubbed of local paths; the full detail goes to the local log only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedsky.shared.datasets import DatasetError, LocalData, load_catalog, load_dataset, scrub
from fedsky.shared.flower.runconfig import TaskConfig
from fedsky.shared.ids import InvalidIdError, check_agent_id
from fedsky.shared.metrics import flatten
from fedsky.shared.modelfile import (
    Architecture,
    ModelFileError,
    build_module,
    check_weights,
    from_array_record,
    load_weights,
    module_weights,
    to_array_record,
)
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from pydantic import ValidationError

log = logging.getLogger(__name__)

# Error codes in replies (Flower's own codes are small numbers).
ERR_CONFIG = 1001
ERR_DATASET = 1002
ERR_MODEL = 1003
ERR_INTERNAL = 1099

app = ClientApp()


class _ClientFailure(Exception):
    def __init__(self, code: int, public: str) -> None:
        super().__init__(public)
        self.code = code
        self.public = public


def _site(context: Context) -> str:
    site = context.node_config.get("site")
    if not isinstance(site, str):
        raise _ClientFailure(ERR_CONFIG, "this SuperNode's node config has no 'site'")
    try:
        return check_agent_id(site)
    except InvalidIdError as exc:
        raise _ClientFailure(ERR_CONFIG, str(exc)) from None


def _data(
    context: Context, site: str, config: TaskConfig, architecture: Architecture
) -> tuple[LocalData, list[Path]]:
    catalog_path = context.node_config.get("dataset-config")
    if not isinstance(catalog_path, str) or not catalog_path:
        raise _ClientFailure(ERR_CONFIG, f"site {site!r} has no dataset-config in its node config")
    try:
        catalog = load_catalog(catalog_path)
    except Exception as exc:
        log.error("cannot load dataset config: %s", exc)
        raise _ClientFailure(ERR_DATASET, f"site {site!r} cannot read its dataset config") from None
    spec = catalog.resolve(config.dataset_for(site), site=site)
    data = load_dataset(
        spec,
        input_shape=architecture.input_shape,
        num_classes=architecture.num_classes,
        class_names=architecture.class_names,
    )
    return data, [Path(catalog_path), *catalog.local_paths()]


def _handle(msg: Message, context: Context, *, train: bool) -> Message:
    site = ""
    secrets: list[Path] = []
    raw = context.node_config.get("dataset-config")
    if isinstance(raw, str):
        secrets.append(Path(raw))
    try:
        threads = context.node_config.get("torch-threads")
        if isinstance(threads, int) and threads > 0:
            import torch

            torch.set_num_threads(threads)
        site = _site(context)
        try:
            config = TaskConfig.model_validate(dict(msg.content.config_records["config"]))
        except (KeyError, ValidationError) as exc:
            raise _ClientFailure(
                ERR_CONFIG, f"the message's config is not a fedsky task: {exc}"
            ) from None
        architecture = Architecture.from_json(config.architecture)
        data, secrets = _data(context, site, config, architecture)
        module = build_module(architecture)
        weights = from_array_record(msg.content.array_records["arrays"], architecture)
        check_weights(architecture, weights)
        load_weights(module, weights)
        return (
            _train(msg, config, site, module, data)
            if train
            else _evaluate(msg, config, site, module, data, architecture)
        )
    except _ClientFailure as exc:
        reason = exc.public
        code = exc.code
    except DatasetError as exc:
        log.error("dataset error: %s", exc)
        reason, code = exc.public_message, ERR_DATASET
    except ModelFileError as exc:
        reason, code = f"the job's model cannot be used here: {exc}", ERR_MODEL
    except Exception as exc:
        log.exception("ClientApp failed")
        reason, code = f"{type(exc).__name__}: {exc}", ERR_INTERNAL
    text = scrub(f"{site or 'a site'}: {reason}", secrets)[:1500]
    return Message(Error(code=code, reason=text), reply_to=msg)


def _reply(msg: Message, site: str, metrics: dict[str, Any], arrays: ArrayRecord | None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site": site})})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, reply_to=msg)


def _train(msg: Message, config: TaskConfig, site: str, module: Any, data: LocalData) -> Message:
    from fedsky.shared.flower.training import site_seed, train

    result = train(
        module,
        data.x_train,
        data.y_train,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        optimizer=config.optimizer,
        seed=site_seed(config.seed, config.server_round, site),
    )
    metrics = {"num-examples": result.examples, "train-loss": result.loss}
    return _reply(msg, site, metrics, to_array_record(module_weights(module)))


def _evaluate(
    msg: Message,
    config: TaskConfig,
    site: str,
    module: Any,
    data: LocalData,
    architecture: Architecture,
) -> Message:
    from fedsky.shared.flower.training import evaluate

    result = evaluate(
        module,
        data.x_eval,
        data.y_eval,
        num_classes=architecture.num_classes,
        batch_size=config.eval_batch_size,
    )
    metrics = {
        "num-examples": result.examples,
        "eval-loss": result.loss,
        "num-classes": architecture.num_classes,
        "confusion": flatten(result.confusion),
    }
    return _reply(msg, site, metrics, None)


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    return _handle(msg, context, train=True)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    return _handle(msg, context, train=False)

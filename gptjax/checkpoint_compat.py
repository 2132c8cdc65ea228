"""Does a saved checkpoint fit today's config? Read from orbax's metadata before restoring,
so a mismatch is one line naming the first parameter (or optimizer-state part) that differs
and the setting to change, instead of a tensorstore shape error."""

import jax

from gptjax import model as model_lib
from gptjax.config import leaves
from gptjax.errors import UserError
from gptjax.sharding import param_name


def check(manager, step: int, abstract_params, train_target, directory) -> None:
  """UserError naming the first parameter whose saved shape differs from the config's, or
  an optimizer state of another structure (e.g. grad_clip switched on or off)."""
  try:
    metadata = manager.item_metadata(step)
    saved = getattr(metadata["params"], "tree", metadata["params"])
    saved_train = getattr(metadata["train"], "tree", metadata["train"])
  except Exception:  # unreadable metadata: restore() reports it as a bad checkpoint
    return
  if saved is None:
    return
  want = {
    param_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)
  }
  have = {
    param_name(p): tuple(getattr(x, "shape", ()))
    for p, x in jax.tree_util.tree_leaves_with_path(saved)
  }
  fix = "resume with the config it was trained with (WORKDIR/config.json) or use a fresh --workdir"
  scanned = [model_lib.is_stacked(names) for names in (have, want)]
  if scanned[0] != scanned[1]:  # the layer layout differs: stacked (h) vs per layer (h_i)
    fix = f"set --config.model.scan_layers={scanned[0]} as it was trained, or use a fresh --workdir"
  for name, shape in want.items():
    if name not in have:
      raise UserError(
        f"checkpoint {step} in {directory} has no parameter {name} (the config "
        f"makes it with shape {shape}); {fix}"
      )
    if have[name] != shape:
      raise UserError(
        f"checkpoint {step} in {directory}: parameter {name} has shape "
        f"{have[name]} but the config makes {shape}; {fix}"
      )
  extra = sorted(set(have) - set(want))
  if extra:
    raise UserError(
      f"checkpoint {step} in {directory} has parameter {extra[0]}, which the "
      f"config does not make; {fix}"
    )
  if train_target is not None and saved_train is not None:
    where = _first_difference(
      _skeleton(saved_train.get("opt_state")), _skeleton(train_target["opt_state"]), "opt_state"
    )
    if where is not None:
      raise UserError(
        f"checkpoint {step} in {directory} holds an optimizer state of another "
        f"structure (first difference at {where}): the optimizer settings "
        f"changed (e.g. optim.grad_clip 0 <-> > 0); {fix}"
      )


def _skeleton(tree):
  """A pytree as orbax's metadata shows it: namedtuples as dicts, tuples as lists, empty
  states as None, arrays as their shapes."""
  if isinstance(tree, dict):
    return {k: _skeleton(v) for k, v in tree.items()}
  if hasattr(tree, "_fields"):
    return {k: _skeleton(getattr(tree, k)) for k in tree._fields} or None
  if isinstance(tree, (list, tuple)):
    return [_skeleton(v) for v in tree]
  return None if tree is None else tuple(getattr(tree, "shape", ()))


def _first_difference(a, b, path: str):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b), key=str):
      if k not in a or k not in b:
        return f"{path}/{k}"
      if (where := _first_difference(a[k], b[k], f"{path}/{k}")) is not None:
        return where
    return None
  if isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      return f"{path} ({len(a)} parts saved, {len(b)} in the config)"
    for i, (x, y) in enumerate(zip(a, b)):
      if (where := _first_difference(x, y, f"{path}/{i}")) is not None:
        return where
    return None
  return None if a == b else path


# What a resumed run may change without changing its training: paths, logging, eval, the
# step count, and how (not what) the model computes.
_SAME_TRAINING = ("model.attention", "model.remat", "model.scan_layers")
_TRAINING = ("model.", "optim.", "train.label_smoothing")  # seed, batch: position_changes


def training_changes(saved: dict, now: dict) -> list[str]:
  """The settings that shape training and differ from the checkpoint's run, as
  "optim.lr 0.003 -> 0.001" (keys that only one of the two configs has are skipped)."""
  old, new = dict(leaves(saved)), dict(leaves(now))
  unset = new.get("optim.decay_steps") is None
  for d in (old, new):  # the schedule's length as optim.py takes it: num_steps when unset
    if d.get("optim.decay_steps") is None and "train.num_steps" in d:
      d["optim.decay_steps"] = d["train.num_steps"]
  note = " (unset, it follows train.num_steps: pass the old value to keep the schedule)"
  return [
    f"{key} {old[key]!r} -> {new[key]!r}{note if unset and key == 'optim.decay_steps' else ''}"
    for key in sorted(set(old) & set(new))
    if key.startswith(_TRAINING) and not key.startswith(_SAME_TRAINING) and old[key] != new[key]
  ]

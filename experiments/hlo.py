"""Reading what XLA made of a program, and compiling for a GPU that is not here.

An optimised HLO module's text (`compiled.as_text()`) says which operations share a
kernel (XLA's fusions), which computations run in loops, and, by the named scopes
invjax/steps.py sets, which part of a training step each instruction belongs to.
`HloIndex` reads it; `census` counts the kernels a program launches (per step, in its
loops, and once a program), by part and kind, and the bytes they move. `launches`
reads XLA's thunk sequence (a dump, after the passes that gather kernels into
command buffers) for what the host itself launches.
`gpu_placement` is a one-device mesh of a GPU described in gpu_targets/, for which
XLA's GPU compiler compiles without the GPU (JAX's CUDA plugin installed, no CUDA
libraries needed). experiments/kernel_census.py, profile_step.py and loss_cost.py use
these; this module defines no flags, so each can import it.
"""

from __future__ import annotations

import collections
import math
import os
import re

from absl import app
import jax
import jax.numpy as jnp
import numpy as np

from invjax import build as build_lib
from invjax import flat_state
from invjax import placement as placement_lib
from invjax import programs as programs_lib
from invjax import steps as steps_lib

PARTS = (
    "seed gather",
    "seed expansion",
    "augmentation",
    "network: convolutions and matmuls",
    "network: batch norm",
    "network: other",
    "invariance loss",
    "optimizer update",
    "other (in the step program)",
    "other (unattributed)",
)
UNATTRIBUTED = PARTS[-1]
# Scopes set in invjax/steps.py, in the order they are tested.
SCOPES = (("seed_gather", "seed gather"), ("expand_seeds", "seed expansion"),
          ("augment", "augmentation"), ("invariance_loss", "invariance loss"),
          ("optimizer", "optimizer update"))
# Instructions that compute nothing of their own: left out of a fusion's vote.
_PASSIVE = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element",
            "broadcast", "reshape", "iota", "copy", "transpose", "slice"}
_MATMUL_TARGET = re.compile(r"cudnn\$conv|cudnn\$fusion|cublas|gemm|matmul", re.I)


# The program's HLO text ----------------------------------------------------------------

_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\(")
_OPERAND = re.compile(r"%([\w.\-]+)")
_CALLS = re.compile(r"\b(?:calls|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


class HloIndex:
  """Every instruction of an optimised HLO module's text: opcode, op_name, the
  computations it calls (fusions, loops) and its custom-call target."""

  def __init__(self, text: str):
    self.module = None
    m = re.search(r"^HloModule\s+([\w.\-]+)", text, re.M)
    if m:
      self.module = m.group(1)
    self.instrs: dict[str, dict] = {}
    self.computations: dict[str, list[str]] = collections.defaultdict(list)
    comp = None
    for line in text.splitlines():
      if not line.startswith(" "):
        c = _COMP.match(line)
        comp = c.group(1) if c else None
        continue
      i = _INSTR.match(line)
      if not i or comp is None:
        continue
      name, opcode = i.group(1), i.group(3)
      calls = _CALLS.findall(line)
      for b in _BRANCHES.findall(line):
        calls += [x.strip().lstrip("%") for x in b.split(",") if x.strip()]
      op = _OP_NAME.search(line)
      target = _TARGET.search(line)
      args = line[i.end():].split(")", 1)[0]
      self.instrs[name] = {"opcode": opcode, "op_name": op.group(1) if op else "",
                           "calls": calls, "target": target.group(1) if target else "",
                           "shape": i.group(2), "operands": _OPERAND.findall(args)}
      if opcode == "parameter":
        self.instrs[name]["number"] = int(args) if args.strip().isdigit() else -1
      if opcode == "while":
        trips = _TRIPS.search(line)
        self.instrs[name]["trips"] = int(trips.group(1)) if trips else None
      self.computations[comp].append(name)
    self._split: dict[str, dict] = {}

  def _is_matmul(self, ins: dict) -> bool:
    return ins["opcode"] in ("convolution", "dot") or (
        ins["opcode"] == "custom-call" and bool(_MATMUL_TARGET.search(ins["target"])))

  def _fused(self, name: str, depth: int = 0) -> list[dict]:
    """The instructions inside a fusion (recursively), or [the instruction]."""
    ins = self.instrs[name]
    if ins["opcode"] != "fusion" or depth > 4:
      return [ins]
    out = []
    for comp in ins["calls"]:
      for sub in self.computations.get(comp, ()):
        out += self._fused(sub, depth + 1)
    return out or [ins]

  def split(self, name: str) -> dict | None:
    """{(part, "forward" | "backward" | ""): fraction} of the instruction's time, or
    None if the module has no such instruction."""
    if name in self._split:
      return self._split[name]
    if name not in self.instrs:
      return None
    inner = self._fused(name)
    matmuls = [i for i in inner if self._is_matmul(i)]
    if matmuls or self._is_matmul(self.instrs[name]):
      # A fusion around a convolution or product is the product's time.
      ins = (matmuls or [self.instrs[name]])[0]
      votes = {classify(ins["op_name"], True): 1.0}
    else:
      active = [i for i in inner if i["opcode"] not in _PASSIVE and "/" in i["op_name"]]
      active = active or [i for i in inner if "/" in i["op_name"]] or [self.instrs[name]]
      votes = collections.Counter(classify(i["op_name"], False) for i in active)
    total = sum(votes.values())
    self._split[name] = {k: v / total for k, v in votes.items()}
    return self._split[name]


def classify(op_name: str, matmul: bool) -> tuple[str, str]:
  """(part, direction) of an instruction from its op_name and whether it is a
  convolution or matrix product."""
  scopes = op_name.split("/")
  direction = "backward" if "transpose(" in op_name else (
      "forward" if "jvp(" in op_name else "")
  for scope, part in SCOPES:
    if any(s == scope or s.endswith("(" + scope + ")") or s.endswith("(" + scope + "))")
           for s in scopes):
      return part, direction if part == "invariance loss" else ""
  if "BatchNorm" in op_name:
    return "network: batch norm", direction
  if matmul:
    return "network: convolutions and matmuls", direction
  if direction:
    return "network: other", direction
  return "other (in the step program)", ""


# Kernels and their bytes ------------------------------------------------------------

TARGETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_targets")
# Instructions that launch nothing: the rest of an executed computation is a kernel each.
_NO_KERNEL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while",
              "conditional", "call", "after-all", "add-dependency", "opt-barrier",
              "partition-id", "replica-id"}


def executions(index: HloIndex, entry: str) -> dict[str, int]:
  """{kernel: how often one execution of the program runs it}: a loop's body as often
  as XLA's known trip count says (once, where it knows none; its condition as often,
  one run short), the branches of a conditional once each (at most)."""
  out: dict[str, int] = collections.Counter()
  todo = [(entry, 1)]
  while todo:
    comp, times = todo.pop()
    for name in index.computations.get(comp, ()):
      ins = index.instrs[name]
      if ins["opcode"] in ("while", "conditional", "call"):
        n = (ins.get("trips") or 1) if ins["opcode"] == "while" else 1
        todo += [(c, times * n) for c in ins["calls"]]
      elif ins["opcode"] not in _NO_KERNEL:
        out[name] += times
  return dict(out)


def kernels(index: HloIndex, entry: str) -> list[tuple[str, bool]]:
  """(instruction, in a loop) of each kernel-launching instruction of the computations
  a program executes: its entry computation and, from there, the bodies, conditions
  and branches of its loops and conditionals (fusions' computations are the kernels'
  insides, not visited). `in a loop`: launched at each iteration of a loop (a step of
  the training program), not once per program."""
  out, todo, seen = [], [(entry, False)], set()
  while todo:
    comp, looped = todo.pop(0)
    if comp in seen:
      continue
    seen.add(comp)
    for name in index.computations.get(comp, ()):
      ins = index.instrs[name]
      if ins["opcode"] in ("while", "conditional", "call"):
        todo += [(c, looped or ins["opcode"] == "while") for c in ins["calls"]]
      elif ins["opcode"] not in _NO_KERNEL:
        out.append((name, looped))
  return out


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")


def shape_bytes(shape: str) -> int:
  """The bytes of an HLO shape (an array, or a tuple of them), e.g. "f32[4,8]{1,0}"."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    size = _BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _operand_bytes(index: HloIndex, ins: dict, number: int, operand: str) -> int:
  """The bytes a kernel reads of its `number`th operand: all of it, but for a fusion
  that only slices it, the slices' (as XLA's cost analysis counts them)."""
  full = shape_bytes(index.instrs[operand]["shape"])
  if ins["opcode"] != "fusion" or not ins["calls"]:
    return full
  body = index.computations.get(ins["calls"][0], ())
  param = next((n for n in body if index.instrs[n]["opcode"] == "parameter"
                and index.instrs[n].get("number") == number), None)
  users = [index.instrs[n] for n in body if param in index.instrs[n]["operands"]]
  if param and users and all(u["opcode"] in ("slice", "dynamic-slice") for u in users):
    return sum(shape_bytes(u["shape"]) for u in users)
  return full


def kernel_bytes(index: HloIndex, name: str) -> int:
  """The bytes a kernel moves, as XLA's cost analysis counts them: its result's and
  each operand's, of an operand a fusion only slices the slices' (equal to XLA:CPU's
  "bytes accessed" on programs of fusions, within 0.5 % on the loss's,
  `tests/test_hlo.py`; a deviceless GPU compile has no cost analysis). Like XLA's
  count, it charges a fusion that computes only a slice of a larger expression its
  operands whole, where the kernel reads only what the slice needs: DenseNet-BC's
  concatenation gradients (loop_slice_fusion) are 9.4 of the 17.1 GB it counts in
  a step, far more than they read."""
  ins = index.instrs[name]
  return shape_bytes(ins["shape"]) + sum(
      _operand_bytes(index, ins, k, o) for k, o in enumerate(ins["operands"])
      if o in index.instrs)


def entry_computation(text: str) -> str:
  """The name of an HLO module's entry computation."""
  return next(line.split()[1].lstrip("%") for line in text.splitlines()
              if line.startswith("ENTRY "))


def step_and_program_kernels(text: str) -> tuple[HloIndex, list[str], list[str]]:
  """(the index of an optimised HLO module, the kernels it launches at each step (in
  its loops; all of them if it has no loop), those it launches once per program
  outside its loops)."""
  index = HloIndex(text)
  found = kernels(index, entry_computation(text))
  has_loop = any(looped for _, looped in found)
  return (index, [n for n, looped in found if looped or not has_loop],
          [n for n, looped in found if has_loop and not looped])


def census(text: str) -> dict:
  """{"kernels": n, "parts": {part: kernels (a mixed fusion split among its parts)},
  "kinds": {fusion | cuDNN / cuBLAS target | opcode: n}, "bytes": what they move
  (`kernel_bytes`)} of the kernels an optimised HLO module launches at each step (in
  its loops), or of all of them if it has no loop; "per_program": the same of those
  launched once per program outside its loops."""
  index, step_kernels, program_kernels = step_and_program_kernels(text)

  def count(names):
    parts, kinds = collections.Counter(), collections.Counter()
    for name in names:
      for (part, _), share in index.split(name).items():
        parts[part] += share
      ins = index.instrs[name]
      kinds[ins["target"] or ins["opcode"]] += 1
    return {"kernels": len(names), "parts": dict(parts), "kinds": dict(kinds),
            "bytes": sum(kernel_bytes(index, n) for n in names)}

  step = count(step_kernels)
  step["per_program"] = count(program_kernels)
  return step


# The program's thunks, after XLA's thunk passes ----------------------------------------

# A line of XLA:GPU's thunk sequence dump (`<module>.thunk_sequence_after_thunk_passes.txt`
# under --xla_dump_to): "NNN: kKind [...] name ...", indented by its nesting; a loop's
# parts are announced by "condition:" and "body:" lines.
_THUNK = re.compile(r"^( *)\d+: (k\w+)")
_SECTION = re.compile(r"^( *)(condition|body|branch[\w ]*):\s*$")
_CONTROL = ("kWhile", "kConditional")


def _thunk_tree(text: str) -> list[dict]:
  """The thunks of a thunk-sequence dump as a tree: {"kind", "members" (a command
  buffer's), "sections" ({"condition": [...], "body": [...]} of a loop)}. A section's
  label belongs to the last loop or conditional seen (XLA prints "condition:" without
  its loop's indentation), and its thunks are those indented under the loop."""
  root: list[dict] = []
  stack = [(-1, root)]  # (indent of the line that opened it, the list it fills)
  last_control = None  # (its indent, the node)
  for line in text.splitlines():
    section = _SECTION.match(line)
    if section:
      if last_control is None:
        raise ValueError(f"thunk sequence: {line.strip()!r} follows no loop")
      indent, owner = last_control
      # Deeper than the loop, shallower than its thunks: the loop's next sibling
      # closes the section, and the section closes the one before it.
      while stack[-1][0] >= indent + 1:
        stack.pop()
      stack.append((indent + 1, owner["sections"].setdefault(section.group(2), [])))
      continue
    thunk = _THUNK.match(line)
    if not thunk:
      continue
    indent = len(thunk.group(1))
    while stack[-1][0] >= indent:
      stack.pop()
    node = {"kind": thunk.group(2), "members": [], "sections": {}}
    stack[-1][1].append(node)
    if node["kind"] == "kCommandBuffer":
      stack.append((indent, node["members"]))
    elif node["kind"] in _CONTROL:
      last_control = (indent, node)
  return root


def _leaves(nodes: list[dict]) -> int:
  """The thunks that run work (not command buffers, loops or conditionals) under nodes."""
  return sum(_leaves(n["members"]) + sum(_leaves(s) for s in n["sections"].values())
             if n["kind"] == "kCommandBuffer" or n["kind"] in _CONTROL else 1
             for n in nodes)


def launches(text: str) -> dict:
  """What the host launches at each step of a program's outermost loop, from XLA:GPU's
  thunk sequence after its thunk passes (the passes that gather thunks into command
  buffers: CUDA graphs, launched whole): {"launches": thunks and command buffers at
  the top of the loop's body and condition, each one launch; "graphs": how many of
  them are command buffers; "thunks": the work thunks they hold in all (kernels,
  cuDNN and cuBLAS calls, copies); "in_graphs": those inside command buffers (all of
  them if the loop is in one); "loop_in_graph": whether the loop itself is a command
  in a command buffer (then the host launches it once a program and "launches" is
  0); "once": launches outside the loop}. A program without a loop is all "once"."""
  tree = _thunk_tree(text)

  def find_loop(nodes, in_graph):
    for n in nodes:
      if n["kind"] == "kWhile":
        return n, in_graph
      found = find_loop(n["members"], in_graph or n["kind"] == "kCommandBuffer")
      if found[0] is not None:
        return found
    return None, False

  loop, loop_in_graph = find_loop(tree, False)
  step = (loop["sections"].get("condition", []) + loop["sections"].get("body", [])
          if loop else [])
  graphs = [n for n in step if n["kind"] == "kCommandBuffer"]
  return {"launches": 0 if loop_in_graph else len(step),
          "graphs": len(graphs),
          "thunks": _leaves(step),
          "in_graphs": _leaves(step) if loop_in_graph else sum(_leaves(g["members"])
                                                                 for g in graphs),
          "loop_in_graph": loop_in_graph,
          "once": len(tree) - (1 if loop and not loop_in_graph else 0)}


def compile_error(text: str) -> str:
  """XLA's compile error in a line: its first, and of its example failure the fused
  computation and the operation it came from (a fusion no backend takes, say)."""
  first = text.split("\n", 1)[0].rstrip(": ").removesuffix(" Example failure")
  called = re.search(r"calls=%([\w.\-]+)", text)
  op = re.search(r'op_name="([^"]+)"', text)
  example = ", ".join(m.group(1) for m in (called, op) if m)
  return f"{first} (for example {example})" if example else first


def state_args(run: build_lib.Run, placement: placement_lib.Placement):
  """The shapes of `run`'s training state as checkpoints keep it, replicated over
  `placement`'s devices (what scoring and attacks take)."""
  state = jax.eval_shape(lambda: build_lib.initial_state(
      run, placement_lib.Placement.create()))
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=placement.replicated), state)


def train_chunk(run: build_lib.Run, placement: placement_lib.Placement, steps: int):
  """`run`'s training program of `steps` steps, as a run with its training set on
  `placement`'s devices runs it (in a loop, the state in the loop's layout, the set as
  rows): the function to lower on `train_args`."""
  return steps_lib.make_train_chunk(
      run.step_config, steps, run.config.batch_size // run.config.copies,
      placement.batch, data_on_device=True, unroll=False, loop_state=True,
      image_shape=run.data.image_shape)


def train_args(run: build_lib.Run, placement: placement_lib.Placement) -> tuple:
  """The shapes and shardings of `run`'s training program's arguments on
  `placement`'s devices, as `programs.TrainPrograms.args` passes them with the training
  set on the devices: (the state in the loop's layout on those devices' platform, the
  training images as rows, labels, this pass's and the next's seed order, first,
  step0, the augmentation key), all replicated. For compiling without the devices
  (kernel_census.py for a GPU, tpu_compile.py for a TPU slice)."""
  state = state_args(run, placement)
  state = jax.eval_shape(flat_state.enter_and_leave(
      state, flat_state.platform_of(placement.batch))[0], state)
  rep = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                  sharding=placement.replicated)
  x, y = programs_lib.as_rows(run.data.x_train), run.data.y_train
  return (jax.tree.map(lambda a: rep(a.shape, a.dtype), state),
          rep(x.shape, x.dtype), rep(y.shape, y.dtype), rep((2, len(x)), jnp.int32),
          rep((), jnp.int32), rep((), jnp.int32), rep((), jax.random.key(0).dtype))


def gpu_placement(target: str) -> placement_lib.Placement:
  """A one-device mesh of a compile-only GPU described by gpu_targets/<target>.txtpb."""
  # Called before JAX starts its backends, this lets the CUDA plugin start without
  # CUDA's libraries (experiments/kernel_census.py sets it before importing JAX).
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  path = os.path.join(TARGETS, f"{target}.txtpb")
  if not os.path.exists(path):
    raise app.UsageError(f"--target={target}: no {path}; valid: "
                         f"{sorted(os.path.splitext(f)[0] for f in os.listdir(TARGETS))}.")
  with open(path) as f:
    description = f.read()
  try:
    topology = topologies.get_topology_desc("", platform="cuda", topology="1x1x1",
                                            target_config=description)
  except (NotImplementedError, RuntimeError) as e:
    import jaxlib  # pylint: disable=g-import-not-at-top
    v = jaxlib.__version__
    raise app.UsageError(
        f"compiling for a GPU without one needs JAX's CUDA plugin ({e}): pip install "
        f"jax-cuda12-plugin=={v} jax-cuda12-pjrt=={v}") from e
  return placement_lib.Placement(jax.sharding.Mesh(
      np.array(topology.devices[:1]), ("data",),
      axis_types=(jax.sharding.AxisType.Auto,)))

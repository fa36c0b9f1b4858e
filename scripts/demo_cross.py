"""TOPD on the demo task with a teacher of another tokenizer (issue 27; docs/remote_teacher.md "A run on the demo
task"): `make demo-cross` (outside `make test`; 60 steps by default; run it under the heavy-work lock).

1. The demo's assets (megatron_topd/task_assets.py, cached in runs/demo/assets): the trained teacher and the
   warm-started student, which share one character-level tokenizer.
2. The teacher given its own tokenizer (runs/demo_cross/teacher_hf): a character-level tokenizer with other ids (the
   symbols in reverse order) and other special tokens (``<s> </s> <|pad|> <|unused|>`` for
   ``<bos> <eos> <pad> <unused>``), the teacher's embedding and output rows re-indexed to it. It is the trained
   teacher, the same function of the text, behind a tokenizer the student does not share: checked here by greedy
   decoding of held-out prompts with both (identical texts).
3. TOPD through the real loop (torchrun, TP=2, real SGLang CPU servers) with teacher.placement=remote,
   teacher.kl=sampled, teacher.tokenizer=cross (auto-detected as cross too) and held-out accuracy by greedy decoding
   before training and every eval.interval steps; runs/demo_cross/run.

    flock /tmp/topd-heavy.lock make demo-cross [ARGS="train.steps=120 ..."]
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_topd.demo import asset_overrides, build_assets, run_and_summarise  # noqa: E402

# the student's token -> the teacher's (the symbols keep their text, in reverse order of ids)
SPECIAL_NAMES = {"<pad>": "<|pad|>", "<bos>": "<s>", "<eos>": "</s>", "<unused>": "<|unused|>"}


def teacher_vocab(student_vocab: dict[str, int]) -> list[str]:
    """The teacher's tokens by id: the symbols reversed, then the specials renamed; the student's last id (kept
    unused) stays last and unused."""
    symbols = [t for t, _ in sorted(student_vocab.items(), key=lambda kv: kv[1]) if t not in SPECIAL_NAMES]
    return symbols[::-1] + [SPECIAL_NAMES[t] for t in ("<eos>", "<bos>", "<pad>", "<unused>")]


def reindexed_teacher(teacher_hf: Path, out: Path) -> Path:
    """The trained teacher behind its own character-level tokenizer (module docstring, point 2)."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    student_tok = AutoTokenizer.from_pretrained(str(teacher_hf))
    old = student_tok.get_vocab()
    new_tokens = teacher_vocab(old)
    back = {v: k for k, v in SPECIAL_NAMES.items()}
    perm = torch.tensor([old[back.get(t, t)] for t in new_tokens])  # new id -> old id
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    state = load_file(str(teacher_hf / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][perm].contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(teacher_hf / "config.json", out / "config.json")
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(new_tokens)}, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<|pad|>", additional_special_tokens=["<|unused|>"])
    fast.save_pretrained(out)
    ids = {"bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id, "pad_token_id": fast.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps({**ids, "do_sample": False}))
    return out


def same_greedy_texts(a: Path, b: Path, heldout: Path, n: int = 40, max_new_tokens: int = 48) -> int:
    """Greedy decoding of ``n`` held-out prompts by both HF folders gives the same texts: the number compared."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = [json.loads(line)["prompt"] for line in heldout.read_text().splitlines()[:n]]
    texts = []
    for folder in (a, b):
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"] for p in prompts])
        with torch.no_grad():
            outs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        texts.append([tok.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in outs])
    if texts[0] != texts[1]:
        bad = next(i for i, (x, y) in enumerate(zip(*texts)) if x != y)
        raise SystemExit(f"the re-indexed teacher decodes prompt {bad} differently: {texts[0][bad]!r} vs "
                         f"{texts[1][bad]!r}")
    return len(prompts)


def main(overrides: list[str]) -> int:
    config_path = str(REPO / "examples" / "cpu_demo.yaml")
    root = REPO / "runs" / "demo_cross"
    paths = build_assets(REPO / "runs" / "demo" / "assets")
    teacher_hf = reindexed_teacher(paths["teacher_hf"], root / "teacher_hf")
    n = same_greedy_texts(paths["teacher_hf"], teacher_hf, paths["heldout"])
    print(f"teacher with its own tokenizer: {teacher_hf} (greedy texts of {n} held-out prompts equal the "
          "original teacher's)", flush=True)
    run_dir = root / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    own = [o for o in asset_overrides(paths) if not o.startswith(("teacher.checkpoint=", "teacher.hf_path="))]
    overrides = [*own, f"teacher.hf_path={teacher_hf}", "teacher.placement=remote", "teacher.kl=sampled",
                 "teacher.tokenizer=cross", "eval.teacher=false", f"train.output_dir={run_dir}",
                 f"rollout.server_log_dir={root / 'logs'}", "train.steps=60", *overrides]
    return run_and_summarise(config_path, overrides, run_dir)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

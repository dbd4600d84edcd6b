"""Write ``benchmarks/data/mixed_corpus.jsonl``: deterministic mixed-script text for the alignment benchmark.

Each sequence stitches hand-written fragments of one or more kinds (prose, numbers and dates, code, emoji
with ZWJ sequences, box drawing, CJK, accents incl. decomposed ones, URLs, whitespace runs, markdown,
HTML). The fragments cover what the paper reports as alignment failures: smart quotes, emoji, box-drawing
characters and code. Run: ``python benchmarks/make_mixed_corpus.py``.
"""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

OUT = Path(__file__).parent / "data" / "mixed_corpus.jsonl"
N_SEQUENCES = 400
SEED = 1989

FRAGMENTS: dict[str, list[str]] = {
    "prose": [
        "The committee met on Tuesday. “We’re not there yet,” the chair said — and nobody disagreed.",
        "It was, as she put it, ‘a rather long afternoon’… but the results were worth the wait.",
        "Rivers don't flow uphill; they can, however, surprise you. Ask anyone who's lived by one.",
        'He wrote: "Don\'t panic." Then, after a pause, he added a footnote¹ and a dagger†.',
        "The model's outputs were compared against a held-out set of 1,000 prompts (see §3.2).",
        "Honestly? I’d rather not — it’s late, it’s cold, and the café closes at nine.",
        "Naïve coöperation between the résumé-writing bots led to a soufflé of clichés.",
        "In the beginning there was text; then tokenizers; then—inevitably—misalignment.",
        "She said «bonjour» and he replied „Guten Tag“; the interpreter simply smiled.",
        "Well... that's one way to do it!!! Isn't it?? (Asked nobody in particular.)",
        "The O’Neills’ dog—an old, grey lurcher—slept through the fireworks on the 5th.",
        "Mr. Smith vs. Mrs. Jones: the case was settled out of court, e.g. without a trial.",
    ],
    "numbers": [
        "In 1989 the wall fell; by 1991 the map had changed. Prices rose 12.5% in Q3 2023.",
        "Total: $1,234,567.89 (≈ €1.13M) as of 2024-03-15T12:30:00Z.",
        "pi ≈ 3.14159265358979, e ≈ 2.71828, and 6.022×10²³ mol⁻¹ is Avogadro's number.",
        "Call +1 (555) 012-3456 or +44 20 7946 0958 before 17:45 on 31/12/1999.",
        "Version 2.10.3-rc1 fixed issue #40213; see build 20240101.7 and commit 9f3c2a1.",
        "Scores: 98/100, 87.25/100, -0.003, 1e-9, 0x1F600, 0b1011, 1_000_000.",
        "The years 1066, 1492, 1776, 1815, 1914–1918 and 1939–1945 appear in every textbook.",
        "Temperature fell from 21.7°C to −4.2°C; that's a drop of 25.9 K in 36 h.",
        "½ cup flour, ¾ tsp salt, 2⅓ cups milk; bake at 180 °C for 25–30 min.",
        "Room 101, floor 3, building B7; ticket no. 000123456789.",
    ],
    "code": [
        'def mean(xs: list[float]) -> float:\n    if not xs:\n        raise ValueError("empty")\n'
        "    return sum(xs) / len(xs)\n",
        "for (int i = 0; i < n; ++i) {\n\tif (a[i] != b[i]) { return -1; }\n}\nreturn 0;\n",
        "const f = async (url) => {\n  const res = await fetch(`${url}?q=1&limit=10`);\n"
        "  return res.json();\n};\n",
        "SELECT id, name, COUNT(*) AS n\nFROM users u\nJOIN orders o ON o.user_id = u.id\nWHERE n >= 3;\n",
        '{"name": "dfc", "version": "0.1.0", "deps": ["torch>=2.4", "transformers"], "ok": true}',
        '#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do wc -l "$f"; done | sort -n | tail -3\n',
        "fn main() {\n    let v: Vec<u32> = (1..=10).map(|x| x * x).collect();\n"
        '    println!("{:?}", v);\n}\n',
        "    x = torch.randn(4, 8)  # (batch, dim)\n    y = x @ W.T + b\n    assert y.shape == (4, 16)\n",
        '<div class="note"><p>Use <code>&lt;br/&gt;</code> &amp; <s>old</s> <b>new</b> tags.</p></div>',
        "if x:=re.match(r'^(\\d{4})-(\\d{2})$', s): print(x[1])  # noqa: E501\n",
        "diff --git a/a.py b/a.py\n@@ -1,3 +1,3 @@\n-    return a+b\n+    return a + b\n",
        "\\begin{equation} \\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2} \\end{equation}",
    ],
    "emoji": [
        "Great job! 🎉🎉 👍🏽 👩‍💻 working late 🌙 — family: 👨‍👩‍👧‍👦 and 🏳️‍🌈 flags 🇫🇷🇯🇵.",
        "Status: ✅ done, ❌ failed, ⚠️ warning, ❤️ love it, 1️⃣ 2️⃣ 3️⃣ #️⃣.",
        "🧑🏿‍🚀 to the moon 🚀🌕; 🫠 melting; 🤷‍♀️ shrug; 👁️‍🗨️ eye in speech bubble.",
        "Weather: ☀️ → ⛅ → 🌧️ → ⛈️; mood: 😀😃😄😁😆😅🤣😂🙂🙃.",
        "Reactions 👍×12 👎×3 😂×7 🔥×20 — top comment by @dev_42 🧵",
    ],
    "box": [
        "┌──────┬──────┐\n│ name │ size │\n├──────┼──────┤\n│ a.py │  1kB │\n└──────┴──────┘\n",
        "project/\n├── src/\n│   ├── main.rs\n│   └── lib.rs\n└── Cargo.toml\n",
        "CPU ▁▂▃▅▇█▇▅▃▂▁ 63%   MEM ░░▒▒▓▓██ 88%   ╔═══╗ ║ok ║ ╚═══╝",
        "Progress: [██████████░░░░░░░░░░] 50% ⣾⣽⣻⢿ ▏▎▍▌▋▊▉█",
        "═══════════ REPORT ═══════════\n╭─ summary ─╮\n╰───────────╯ ◆ ◇ ● ○ ■ □ ▲ △",
    ],
    "cjk": [
        "今天天气很好，我们去公园散步吧！明天见。",
        "東京は日本の首都です。「こんにちは」と彼は言った。カタカナとひらがな。",
        "한국어 문장도 포함합니다: 안녕하세요, 반갑습니다.",
        "混合テキスト: GPU 内存 24GB，模型 7B 参数（约 14GB fp16）。",
        "全角文字：ＡＢＣ１２３！？　半角：ABC123!? 「引用」『二重』【注】",
        "中文标点“引号”和‘单引号’，还有《书名号》……以及——破折号。",
    ],
    "accents": [
        "Ça va? Où est la bibliothèque? L’été dernier, à Montréal, c’était génial.",
        "Größe, Straße, Äpfel, Öl, Übermut — ß vs ẞ; Zürich, Köln, Düsseldorf.",
        "Tiếng Việt có nhiều dấu: Người ta nói rằng phở ngon nhất ở Hà Nội.",
        "Ελληνικά: Καλημέρα κόσμε. Русский: Привет, мир! Українська: Добрий день.",
        "العربية: مرحبا بالعالم. עברית: שלום עולם. हिन्दी: नमस्ते दुनिया, क्या हाल है?",
        "ภาษาไทย: สวัสดีครับ ยินดีต้อนรับ. Türkçe: İstanbul, ığdır, şeker, çay.",
        "Polski: Zażółć gęślą jaźń. Čeština: Příliš žluťoučký kůň úpěl ďábelské ódy.",
    ],
    "urls": [
        "See https://example.com/path/to/page?id=42&lang=en#section-3 for details.",
        "Mirror: http://mirror.example.org:8080/pub/linux/v6.1/linux-6.1.tar.xz (sha256 in SHA256SUMS).",
        "Email jane.doe+test@sub.example.co.uk or ops@example.io; ssh git@github.com:org/repo.git",
        "Path C:\\Users\\Admin\\Documents\\report_final(2).docx vs /home/user/.config/app/settings.json",
        "Wiki: https://de.wikipedia.org/wiki/Stra%C3%9Fe and https://例え.jp/パス?q=テスト",
    ],
    "whitespace": [
        "col1    col2\tcol3\t\tcol4\n\n\n   indented   line   \n",
        "line one\r\nline two\r\n\r\n    four spaces\ttab\n",
        "non\u00a0breaking\u00a0space, thin\u2009space, ideographic\u3000space, em\u2003space.",
        "trailing spaces   \n\n\t\n  \n        deeply indented\n",
        "a  b   c    d     e      f       g        h",
    ],
    "markdown": [
        "| Model | Params | Score |\n|:------|-------:|:-----:|\n| A | 7B | 61.2 |\n| B | 13B | 64.8 |\n",
        "# Title\n\n## Subtitle\n\n- item **bold** and *italic*\n- `inline code`\n  1. nested\n\n> quote\n",
        "```python\nprint('hello')\n```\n\n---\n\n[link](https://example.com) ![img](a.png)",
        "**Note:** the ~~old~~ new API returns `None` — see [docs](#api) & footnote[^1].\n\n[^1]: here.",
    ],
}
KINDS = list(FRAGMENTS)


def _variant(text: str, rng: random.Random) -> str:
    """Small deterministic variations so sequences are not verbatim copies of each other."""
    roll = rng.random()
    if roll < 0.1:
        # Decomposed accents (NFD) as produced by macOS file names and some scrapers.
        return unicodedata.normalize("NFD", text)
    if roll < 0.2:
        return text.upper() if text.isascii() else text
    if roll < 0.3:
        return text.replace(" ", "  ")
    return text


def make_sequence(rng: random.Random) -> tuple[str, str]:
    """One sequence: a main kind, sometimes mixed with others, joined by varied separators."""
    main = rng.choice(KINDS)
    kinds = [main] if rng.random() < 0.4 else [main, *rng.sample(KINDS, rng.randint(1, 3))]
    parts = []
    for _ in range(rng.randint(2, 7)):
        kind = rng.choice(kinds)
        parts.append(_variant(rng.choice(FRAGMENTS[kind]), rng))
    text = "".join(p + rng.choice([" ", "\n", "\n\n", "  ", "\t", ""]) for p in parts).rstrip()
    label = main if len(kinds) == 1 else "mixed:" + "+".join(sorted(set(kinds)))
    return label, text


def main() -> None:
    rng = random.Random(SEED)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for i in range(N_SEQUENCES):
            kind, text = make_sequence(rng)
            f.write(json.dumps({"id": i, "kind": kind, "text": text}, ensure_ascii=False) + "\n")
    print(f"wrote {N_SEQUENCES} sequences to {OUT}")


if __name__ == "__main__":
    main()

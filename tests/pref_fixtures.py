"""Preference data for the DPO and SimPO tests: arithmetic prompts, a right and a wrong answer of varied lengths."""

import json
import random
from pathlib import Path


def write_preference_data(path: Path, n: int = 12, seed: int = 0) -> Path:
    """Chosen: the right sum then " Indeed." repeated; rejected: a wrong sum then " You add numbers." repeated;
    separable by content, with response lengths that differ within a pair and across pairs."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            prompt = [{"role": "user", "content": f"What is {a} plus {b}?"}]
            if i % 3 == 0:
                prompt.insert(0, {"role": "system", "content": "You add numbers."})
            chosen = f"{a} plus {b} is {a + b}." + " Indeed." * rng.randint(0, 5)
            rejected = f"{a} plus {b} is {a + b + rng.randint(1, 9)}." + " You add numbers." * rng.randint(0, 3)
            f.write(json.dumps({"chosen": prompt + [{"role": "assistant", "content": chosen}],
                                "rejected": prompt + [{"role": "assistant", "content": rejected}]}) + "\n")
    return path

r"""How two prediction files of the same questions differ (e.g. one config and seed on two GPUs).

  python benchmarks/flips.py A.jsonl[.gz] B.jsonl[.gz]

Prints one JSON line: questions, identical completions, questions whose completion differs, those
that turned right or wrong (flexible score), and the first position where differing completions
part (in characters: the median), which tells a late greedy flip from a different answer.
"""

import gzip
import json
import statistics
import sys


def _read(path: str) -> list[dict]:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt') as f:
    return [json.loads(line) for line in f if line.strip()]


def compare(a: list[dict], b: list[dict]) -> dict:
  if [r['question'] for r in a] != [r['question'] for r in b]:
    raise ValueError('the files hold different questions or orders')
  differ = [(x, y) for x, y in zip(a, b) if x['completion'] != y['completion']]

  def parts(x: str, y: str) -> int:
    return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))

  return {'questions': len(a), 'identical': len(a) - len(differ), 'different': len(differ),
          'right_in_a_only': sum(x['correct_flexible'] and not y['correct_flexible']
                                 for x, y in differ),
          'right_in_b_only': sum(y['correct_flexible'] and not x['correct_flexible']
                                 for x, y in differ),
          'median_chars_before_parting': statistics.median(
              parts(x['completion'], y['completion']) for x, y in differ) if differ else None,
          'accuracy_a': sum(x['correct_flexible'] for x in a) / len(a),
          'accuracy_b': sum(y['correct_flexible'] for y in b) / len(b)}


if __name__ == '__main__':
  print(json.dumps({'a': sys.argv[1], 'b': sys.argv[2], **compare(_read(sys.argv[1]),
                                                                   _read(sys.argv[2]))}))

"""`rsa merge A B --weight W --out C`: write (1 - W) A + W B (P-SACPO)."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("a", help="first saved model folder or hub id ORG/NAME[@REV] (its config and tokenizer are copied)")
    parser.add_argument("b", help="second saved model folder or hub id, same architecture")
    parser.add_argument("--weight", type=float, required=True, help="W in [0, 1]: the weight of B")
    parser.add_argument("--out", required=True, help="output folder")


def run(args) -> int:
    from rsa.merge import merge_models
    print(merge_models(args.a, args.b, args.weight, args.out))
    return 0

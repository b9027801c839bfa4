# `ramster pools [list|create|destroy|accept-loss]`: the pools of a node.  With no action it lists
# them; a pool marked lost (the node crashed) shows it, until accept-loss.
from __future__ import annotations

import argparse

from ramster.cli.table import print_table
from ramster.cli.target import add_target, connect, pool_id
from ramster.client.aio import KINDS
from ramster.zcache import ALLOCATORS


def _list(args: argparse.Namespace) -> int:
    with connect(args) as client:
        pools = client.list_pools()
    if not pools:
        print("no pools")
        return 0
    print_table(
        ["pool", "kind", "allocator", "pages", "lost"],
        [[p.pool, p.kind, p.allocator, p.pages, "LOST" if p.lost else "-"] for p in pools],
    )
    if any(p.lost for p in pools):
        print(
            "LOST: the node crashed; pages held in RAM alone are gone, and gets of pages the "
            "pool lacks fail (DATA_LOSS) until `ramster pools accept-loss POOL`"
        )
    return 0


def _create(args: argparse.Namespace) -> int:
    with connect(args) as client:
        pool = client.create_pool(args.kind, args.allocator)
    print(pool)
    return 0


def _destroy(args: argparse.Namespace) -> int:
    with connect(args) as client:
        pages = client.destroy_pool(args.pool)
    print(f"destroyed pool {args.pool} ({pages} pages dropped)")
    return 0


def _accept_loss(args: argparse.Namespace) -> int:
    with connect(args) as client:
        was = client.accept_loss(args.pool)
    print(f"pool {args.pool}: " + ("losses accepted" if was else "not marked lost"))
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pools = commands.add_parser(
        "pools",
        help="list, create or destroy a node's pools, or accept a crash's losses",
        description="List a node's pools (the default), create one (its id is printed), "
        "destroy one with every page in it, or clear the mark a crash of the node leaves on "
        "its persistent pools (accept-loss).",
    )
    add_target(pools)
    pools.set_defaults(func=_list)
    actions = pools.add_subparsers(dest="action", metavar="ACTION")
    p = actions.add_parser("list", help="list the pools (the default)")
    p.set_defaults(func=_list)
    p = actions.add_parser("create", help="create a pool and print its id")
    p.add_argument("--kind", choices=tuple(KINDS), default="persistent")
    p.add_argument("--allocator", choices=ALLOCATORS, help="default: the node's")
    p.set_defaults(func=_create)
    p = actions.add_parser("destroy", help="destroy a pool and every page in it")
    p.add_argument("pool", type=pool_id, metavar="POOL")
    p.set_defaults(func=_destroy)
    p = actions.add_parser(
        "accept-loss",
        help="clear a pool's lost mark: its gets of missing pages are misses again",
        description="After a crash of the node, a persistent pool is marked lost: pages it "
        "held in RAM alone are gone, and a get of a page it lacks fails (DATA_LOSS) rather than "
        "answer a miss that looks like 'never stored'.  Once the owner knows what it lost, this "
        "clears the mark.",
    )
    p.add_argument("pool", type=pool_id, metavar="POOL")
    p.set_defaults(func=_accept_loss)
    for action in actions.choices.values():
        add_target(action, again=True)

#!/usr/bin/env python3
"""Checks that the compose `cluster` profile agrees with the files it is built from.

docker-compose's `config` only checks the shape of docker-compose.yml; nothing there knows
that the node names of rabbitmq/cluster.conf must be the nodes' hostnames, or that the
cluster's definitions must stay the single broker's minus its queues. This does:

  - rabbitmq/definitions.cluster.json is rabbitmq/definitions.json without queues and
    bindings (a user or policy added to one and not the other fails here);
  - every RabbitMQ service of the profile has hostname = service name, its own data volume,
    cluster.conf and the cluster definitions mounted, and the same Erlang cookie;
  - cluster.conf lists exactly those nodes (rabbit@<hostname>);
  - every llmq service of the profile has all those nodes in LLMQ_AMQP__URLS, quorum queues,
    and depends only on services of the profile or on services with no profile;
  - no service outside the profile depends on one inside it (it could not start without it).

Usage: scripts/check-compose-cluster.py   (from anywhere; needs PyYAML)
Prints "compose cluster: ..." and exits 0, or one "FAIL ..." line per problem and exits 1.
"""
import json
import os
import re
import sys

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROFILE = "cluster"
problems = []


def fail(msg):
    problems.append(msg)


def read(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


def check_definitions():
    single = json.loads(read("rabbitmq/definitions.json"))
    cluster = json.loads(read("rabbitmq/definitions.cluster.json"))
    for key in ("queues", "bindings"):
        if cluster.get(key):
            fail("definitions.cluster.json declares %s: leave them to the workers, which "
                 "declare them with the configured queue type" % key)
    for key in sorted(set(single) | set(cluster)):
        if key in ("queues", "bindings"):
            continue
        if single.get(key) != cluster.get(key):
            fail("definitions.cluster.json differs from definitions.json in %r: only queues "
                 "and bindings may differ" % key)


def env_of(service):
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=value form
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return env


def mounts_of(service):
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            if len(parts) >= 2:
                out[parts[1]] = parts[0]
        elif isinstance(v, dict):
            out[v.get("target")] = v.get("source")
    return out


def check_compose():
    compose = yaml.safe_load(read("docker-compose.yml"))
    services = compose.get("services") or {}
    in_profile = {n for n, s in services.items() if PROFILE in (s.get("profiles") or [])}
    if not in_profile:
        fail("docker-compose.yml has no service in the %r profile" % PROFILE)
        return
    nodes = sorted(n for n in in_profile
                   if str(services[n].get("image", "")).startswith("rabbitmq:"))
    workers = sorted(n for n in in_profile
                     if str(services[n].get("image", "")).startswith("llmq:"))
    if len(nodes) < 3 or len(nodes) % 2 == 0:
        fail("the %r profile has %d RabbitMQ nodes: quorum queues need an odd number, at "
             "least 3" % (PROFILE, len(nodes)))
    if not workers:
        fail("the %r profile has no llmq worker" % PROFILE)

    cookies, volumes = set(), []
    for n in nodes:
        s = services[n]
        if s.get("hostname") != n:
            fail("%s: hostname must be %r (its node name rabbit@<hostname> must resolve "
                 "for the other nodes, and stay the same across re-creation)" % (n, n))
        m = mounts_of(s)
        if m.get("/etc/rabbitmq/definitions.json") != "./rabbitmq/definitions.cluster.json":
            fail("%s: mount ./rabbitmq/definitions.cluster.json at "
                 "/etc/rabbitmq/definitions.json" % n)
        if not any(t.startswith("/etc/rabbitmq/conf.d/") and src == "./rabbitmq/cluster.conf"
                   for t, src in m.items()):
            fail("%s: mount ./rabbitmq/cluster.conf into /etc/rabbitmq/conf.d/" % n)
        volumes.append(m.get("/var/lib/rabbitmq"))
        cookies.add(env_of(s).get("RABBITMQ_ERLANG_COOKIE"))
    if None in volumes or len(set(volumes)) != len(volumes):
        fail("every node needs its own volume at /var/lib/rabbitmq, got %s" % volumes)
    if len(cookies) != 1 or None in cookies:
        fail("the nodes must share one RABBITMQ_ERLANG_COOKIE, got %d values" % len(cookies))

    conf = read("rabbitmq/cluster.conf")
    listed = re.findall(r"^\s*cluster_formation\.classic_config\.nodes\.\d+\s*=\s*(\S+)",
                        conf, re.M)
    want = ["rabbit@%s" % n for n in nodes]
    if sorted(listed) != want:
        fail("cluster.conf lists %s, the profile's nodes are %s" % (sorted(listed), want))

    for w in workers:
        env = env_of(services[w])
        if "LLMQ_AMQP__URL" in env:
            fail("%s: LLMQ_AMQP__URL is for a single broker; give LLMQ_AMQP__URLS only" % w)
        urls = str(env.get("LLMQ_AMQP__URLS", "")).strip()
        hosts = re.findall(r"amqps?://(?:[^@/\s,]*@)?([^:/\s,\]]+)", urls)
        if not (urls.startswith("[") and urls.endswith("]")) or sorted(hosts) != nodes:
            fail("%s: LLMQ_AMQP__URLS must be a [list] with one URL per node %s, got %r"
                 % (w, nodes, urls))
        if env.get("LLMQ_TOPOLOGY__QUEUE_TYPE") != "quorum":
            fail("%s: LLMQ_TOPOLOGY__QUEUE_TYPE must be quorum" % w)

    for n, s in services.items():
        deps = s.get("depends_on") or []
        deps = list(deps) if isinstance(deps, (list, dict)) else []
        for d in deps:
            dep_profiles = (services.get(d) or {}).get("profiles") or []
            if n not in in_profile and d in in_profile:
                fail("%s (no %r profile) depends on %s, which only starts with it"
                     % (n, PROFILE, d))
            if n in in_profile and dep_profiles and PROFILE not in dep_profiles:
                fail("%s depends on %s, which the %r profile does not start" % (n, d, PROFILE))
    return nodes, workers


def main():
    check_definitions()
    found = check_compose()
    if problems:
        for p in problems:
            print("FAIL %s" % p)
        sys.exit(1)
    nodes, workers = found
    print("compose cluster: nodes %s match cluster.conf; %s given all of them and quorum "
          "queues; definitions.cluster.json = definitions.json without queues"
          % (", ".join(nodes), ", ".join(workers)))


if __name__ == "__main__":
    main()

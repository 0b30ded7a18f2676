#!/bin/sh
# `serve`: train the default victim and its default detectors when the volume has none, then
# serve it on all interfaces. `train-victim`: only the training step (compose runs it once,
# before the API replicas).
# Anything else runs as given (e.g. `mlaas attack ...`, `mlaas logs`).
set -e
victim="${MLAAS_VICTIM_DIR:-/var/lib/mlaas/victims/fashion}"
train_if_missing() {
    if [ ! -f "$victim/card.json" ]; then
        echo "no victim in $victim: training the default one" >&2
        mlaas victim train --out "$victim"
    fi
    if [ ! -f "$victim/defense/ood-binary.npz" ] || [ ! -f "$victim/defense/mahalanobis.npz" ]; then
        echo "training the default detectors for $victim" >&2
        mlaas defense train default --victim "$victim"
    fi
}
case "$1" in
    serve)
        shift
        # No default secret: a served API needs the operator's own admin token (the server
        # refuses one under 32 characters).
        if [ -z "${MLAAS_ADMIN_TOKEN:-}" ]; then
            echo "set MLAAS_ADMIN_TOKEN (32+ characters) before serving, e.g. in .env:" >&2
            echo "  MLAAS_ADMIN_TOKEN=\$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')" >&2
            exit 1
        fi
        train_if_missing
        exec mlaas serve --victim "$victim" --host 0.0.0.0 --port 8000 \
            --workers "${MLAAS_WORKERS:-1}" "$@"
        ;;
    train-victim)
        train_if_missing
        ;;
    *)
        exec "$@"
        ;;
esac

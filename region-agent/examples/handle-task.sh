#!/bin/sh
# A task handler for region-agent (`--exec region-agent/examples/handle-task.sh`).
# The payload arrives on stdin; each attribute as FEDERATION_ATTR_<NAME>
# (upper case), the task id as FEDERATION_TASK_ID, the attempt number as
# FEDERATION_ATTEMPT. Whatever it prints on stdout (bounded) is the task's
# result; exit 0 means succeeded, anything else failed. Execution is
# at-least-once: a handler must be safe to run twice for the same task id.
set -eu
bytes=$(wc -c | tr -d ' ')
echo "task ${FEDERATION_TASK_ID:-?} (attempt ${FEDERATION_ATTEMPT:-1}): customer_region=${FEDERATION_ATTR_CUSTOMER_REGION:-unset}, ${bytes} payload bytes"

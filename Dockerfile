FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY lambdalake lambdalake
COPY functions functions
COPY speed speed
COPY batch batch
COPY serving serving
RUN pip install --no-cache-dir '.[kafka,spark]'
ENTRYPOINT ["lambdalake"]

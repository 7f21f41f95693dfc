# syntax=docker/dockerfile:1
# lambdalake's image: the wheel (not editable) with its kafka and spark extras in a virtual
# environment, Java 17 and the Spark jars (s3a), run as a non-root user.
#   docker build -t lambdalake .
# One image for every lambdalake service of docker-compose.yml, and for the Spark master and
# worker (started from the pyspark it carries, so their version is the driver's).

FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jdk-headless maven \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN python -m pip install --no-cache-dir build \
    && python -m build --wheel --outdir /dist
RUN python -m venv /opt/lambdalake \
    && /opt/lambdalake/bin/pip install --no-cache-dir "$(ls /dist/lambdalake-*.whl)[kafka,spark]"
ENV LAMBDALAKE_CACHE=/opt/lambdalake-cache
# the s3a jars matching the Hadoop inside pyspark, fetched now: the services never download
RUN /opt/lambdalake/bin/python -c \
    "from lambdalake.resources import run_script; print(run_script('spark_jars.sh'))"

FROM python:3.11-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 lambdalake \
    && install -d -o lambdalake -g lambdalake /var/lib/lambdalake
COPY --from=build /opt/lambdalake /opt/lambdalake
COPY --from=build --chown=lambdalake:lambdalake /opt/lambdalake-cache /opt/lambdalake-cache
ENV PATH=/opt/lambdalake/bin:$PATH \
    JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64 \
    LAMBDALAKE_CACHE=/opt/lambdalake-cache \
    LAMBDALAKE_HOME=/var/lib/lambdalake \
    PYTHONUNBUFFERED=1
USER lambdalake
WORKDIR /var/lib/lambdalake
VOLUME ["/var/lib/lambdalake"]
ENTRYPOINT ["lambdalake"]
CMD ["up", "--help"]

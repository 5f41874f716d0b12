#!/bin/sh
# Regenerates the kubeconfig test fixtures: a throwaway CA (ca.crt) and a client
# certificate it signed (client.crt, client.key; EC P-256, PKCS#8). Test-only: the
# private keys were never used anywhere else. Run from this directory.
set -eu
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 36500 \
  -subj /CN=imgcoord-test-ca -keyout ca.key -out ca.crt
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj /CN=imgcoord-test-client/O=system:masters -keyout client.key -out client.csr
# X.509 v3 (extensions given): webpki refuses v1 certificates.
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n' > client.ext
openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 36500 \
  -extfile client.ext -out client.crt
rm -f ca.key ca.srl client.csr client.ext

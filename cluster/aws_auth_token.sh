#!/usr/bin/env bash
# Put the cluster's shared Ray auth token in ~/.ray/auth_token on this node (run by every node of
# cluster/aws.yaml before `ray start`; Ray reads that file when RAY_AUTH_MODE=token).
#
# The token lives in AWS Secrets Manager (secret id: $T2I_AUTH_TOKEN_SECRET, default
# ray-t2i/auth-token) and is read with the node's instance profile, so every node presents the
# same token and none of it is in the repo, the cluster YAML, or a log: the value goes straight
# from the AWS CLI into a 0600 file and is never echoed. Create the secret once:
#   aws secretsmanager create-secret --name ray-t2i/auth-token \
#     --secret-string "$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
#
# Region: $AWS_REGION, else the instance's own region from the metadata service (IMDSv2).
set -euo pipefail

secret="${T2I_AUTH_TOKEN_SECRET:-ray-t2i/auth-token}"
dest="${T2I_AUTH_TOKEN_FILE:-$HOME/.ray/auth_token}"
region="${AWS_REGION:-}"
if [[ -z "$region" ]]; then
  imds=http://169.254.169.254/latest
  imds_token=$(curl -sf -X PUT "$imds/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 60")
  region=$(curl -sf -H "X-aws-ec2-metadata-token: $imds_token" "$imds/meta-data/placement/region")
fi

umask 077
mkdir -p "$(dirname "$dest")"
tmp="$dest.tmp.$$"
trap 'rm -f "$tmp"' EXIT
if ! aws secretsmanager get-secret-value --region "$region" --secret-id "$secret" \
  --query SecretString --output text >"$tmp"; then
  echo "aws_auth_token.sh: cannot read secret '$secret' in $region: does the node's instance" \
    "profile allow secretsmanager:GetSecretValue on it?" >&2
  exit 1
fi
if [[ ! -s "$tmp" ]] || [[ "$(tr -d '[:space:]' <"$tmp")" == "None" ]]; then
  echo "aws_auth_token.sh: secret '$secret' is empty" >&2
  exit 1
fi
tr -d '\n' <"$tmp" >"$dest.new" && mv -f "$dest.new" "$dest"
echo "aws_auth_token.sh: wrote the Ray auth token from secret '$secret' to $dest"

# Renders cps-attach configurations the way the module does, for `cps-attach validate` (ci/terraform).
# No provider, no resources: `terraform apply` here only evaluates the node-config module.

terraform {
  required_version = ">= 1.7.0"
}

locals {
  volume = {
    device_name            = "/dev/sdf"
    size_in_gibs           = 100
    type                   = "gp3"
    iops                   = 6000
    throughput_mib_per_sec = 250
    mount_path             = "/var/lib/kafka"
    file_system_type       = "xfs"
    mount_params           = ["noatime"]
    mount_path_owner_user  = "root"
    mount_path_owner_group = "root"
  }
  nodes = {
    # configure/health commands, no files
    commands = { files = [], script = null, configure = ["/usr/local/bin/configure"], health = ["/usr/local/bin/healthy"], kms = null }
    # node files
    files = { files = [{ contents = "bm9kZS5pZD0yCg==", destination = "/etc/kafka/node.properties" }], script = null, configure = [], health = [], kms = null }
    # secrets read at boot from SSM Parameter Store and Secrets Manager
    secrets = { files = [{ content_from = "ssm:/kafka/jaas", destination = "/etc/kafka/jaas.conf" }, { content_from = "secretsmanager:kafka/tls-key", destination = "/etc/kafka/tls.key" }], script = null, configure = [], health = [], kms = null }
    # the second design's script contract and a customer-managed key
    script = { files = [], script = "IyEvYmluL2Jhc2gKY29uZmlndXJlX2NsdXN0ZXJfbm9kZSgpIHsgOjsgfQp3YWl0X2Zvcl9oZWFsdGh5X2NsdXN0ZXIoKSB7IDo7IH0K", configure = [], health = [], kms = "arn:aws:kms:eu-west-1:123456789012:key/0b0b0b0b-1111-2222-3333-444444444444" }
  }
}

module "node_config" {
  source   = "../../modules/node-config"
  for_each = local.nodes

  cluster_name            = "kafka"
  node_id                 = each.key
  lifecycle_hook_name     = "kafka-launch"
  data_volume             = local.volume
  encrypted               = true
  kms_key_id              = each.value.kms
  files                   = each.value.files
  node_config_script      = each.value.script
  configure_command       = each.value.configure
  health_command          = each.value.health
  command_timeout_seconds = 1800
  # One node with relocation on, so `cps-attach validate` reads that section as rendered.
  relocation = each.key == "commands" ? { mode = "snapshot", lock_table = "kafka-cps-relocation", delete_source = true } : null
}

output "configs" {
  value = { for id, m in module.node_config : id => m.yaml }
}

# The bench's node (bins/attach/tests/e2e/iam.rs) reads one parameter and one secret, and may
# relocate its volume (deleting the source), so every action the module can grant is there.
module "policy" {
  source         = "../../modules/node-policy"
  app_name       = "iam-e2e"
  kms_key_id     = null
  secrets        = ["ssm:/iam-e2e/jaas", "secretsmanager:iam-e2e/tls-key"]
  relocation     = true
  lock_table_arn = "arn:aws:dynamodb:us-east-1:123456789012:table/iam-e2e-cps-relocation"
  delete_source  = true
}

output "policy" {
  value = module.policy.json
}

# Renders one node's user data the way the module does, for the VM tier (ci/vm/run): a guest
# boots with it through cloud-init, downloads cps-attach from the bench's file server and runs
# it. No provider, no resources: `terraform apply` only evaluates the node-config module, which
# is what the module's launch templates carry (base64-encoded).

terraform {
  required_version = ">= 1.7.0"
}

variable "cps_attach_url" {
  type = string
}

variable "cps_attach_sha256" {
  type = string
}

variable "file_system_type" {
  type    = string
  default = "ext4"
}

module "node_config" {
  source = "../../modules/node-config"

  cluster_name        = "vm"
  node_id             = "1"
  lifecycle_hook_name = "vm-launch"
  data_volume = {
    device_name            = "/dev/sdf"
    size_in_gibs           = 1
    type                   = "gp3"
    mount_path             = "/var/lib/app"
    file_system_type       = var.file_system_type
    mount_params           = ["noatime"]
    mount_path_owner_user  = "root"
    mount_path_owner_group = "root"
  }
  encrypted               = false
  kms_key_id              = null
  files                   = [{ contents = "bm9kZS5pZD0xCg==", destination = "/etc/app/node.properties" }]
  node_config_script      = null
  configure_command       = []
  health_command          = []
  command_timeout_seconds = 300
  cps_attach_source       = { url = var.cps_attach_url, sha256 = var.cps_attach_sha256 }
  region                  = "us-east-1"
}

output "user_data" {
  value = module.node_config.user_data
}

# Renders one node's cps-attach configuration and the user data that installs and runs it. No
# resources and no provider: the module, the test suite and the VM tier render them the same
# way; the tests run `cps-attach validate` on the configuration and boot a guest with the user
# data.

terraform {
  required_version = ">= 1.7.0"
}

variable "cluster_name" {
  description = "Value of the cps:cluster tag on the node's volume, interface and group."
  type        = string
}

variable "node_id" {
  description = "The node's id (value of the cps:node-id tag)."
  type        = string
}

variable "lifecycle_hook_name" {
  description = "The group's launching lifecycle hook."
  type        = string
}

variable "data_volume" {
  description = "The data volume (the module's data_volume variable)."
  type = object({
    device_name            = string
    size_in_gibs           = number
    type                   = string
    iops                   = optional(number)
    throughput_mib_per_sec = optional(number)
    mount_path             = string
    file_system_type       = string
    mount_params           = list(string)
    mount_path_owner_user  = string
    mount_path_owner_group = string
  })
}

variable "encrypted" {
  type = bool
}

variable "kms_key_id" {
  type = string
}

variable "files" {
  description = "Files for this node: destination and base64 contents, or content_from (ssm:… or secretsmanager:…)."
  type = list(object({
    contents     = optional(string)
    content_from = optional(string)
    destination  = string
  }))
}

variable "node_config_script" {
  description = "Base64 script defining configure_cluster_node and wait_for_healthy_cluster, or null."
  type        = string
}

variable "configure_command" {
  type = list(string)
}

variable "health_command" {
  type = list(string)
}

variable "command_timeout_seconds" {
  type = number
}

variable "relocation" {
  description = "Moving the node's data to another zone: { mode = \"snapshot\", lock_table = DynamoDB table name, delete_source }, or null for never (nothing rendered)."
  type = object({
    mode          = string
    lock_table    = string
    delete_source = bool
  })
  default = null
}

locals {
  script_path = "/etc/cps/node-config.sh"
  # The second design's contract: one script with two functions, sourced by each hook.
  script_hooks = var.node_config_script == null ? {} : {
    configure = ["bash", "-c", "source ${local.script_path} && configure_cluster_node"]
    health    = ["bash", "-c", "source ${local.script_path} && wait_for_healthy_cluster"]
  }
  command_hooks = merge(
    length(var.configure_command) > 0 ? { configure = var.configure_command } : {},
    length(var.health_command) > 0 ? { health = var.health_command } : {},
  )
  hooks = merge(local.script_hooks, local.command_hooks)

  files = concat(
    # Either content-base64 or content-from (a secret read at boot, never in user data).
    [for f in var.files : { for k, v in { path = f.destination, "content-base64" = f.contents, "content-from" = f.content_from } : k => v if v != null }],
    var.node_config_script == null ? [] : [{
      path             = local.script_path
      "content-base64" = var.node_config_script
      mode             = "0700"
    }],
  )

  volume = merge(
    {
      "ebs-tags" = { "cps:cluster" = var.cluster_name }
      type       = var.data_volume.type
      size       = var.data_volume.size_in_gibs
      encrypted  = var.encrypted
    },
    var.data_volume.iops == null ? {} : { iops = var.data_volume.iops },
    var.data_volume.throughput_mib_per_sec == null ? {} : { throughput = var.data_volume.throughput_mib_per_sec },
    var.kms_key_id == null ? {} : { "kms-key-id" = var.kms_key_id },
  )

  config = merge(
    {
      "block-device"   = var.data_volume.device_name
      "block-provider" = { "aws-ebs" = local.volume }
      "file-system"    = { type = var.data_volume.file_system_type }
      mount = merge(
        {
          target = var.data_volume.mount_path
          owner  = var.data_volume.mount_path_owner_user
          group  = var.data_volume.mount_path_owner_group
          # User data runs once per instance: after a reboot only fstab mounts the volume
          # again (nofail, by UUID).
          persist = "fstab"
        },
        length(var.data_volume.mount_params) > 0 ? { options = var.data_volume.mount_params } : {},
      )
      identity            = { mode = "node-id", "node-id" = var.node_id }
      "network-interface" = { "device-index" = 1 }
      lifecycle           = { hook = var.lifecycle_hook_name }
      "command-timeout"   = "${var.command_timeout_seconds}s"
    },
    length(local.files) > 0 ? { files = local.files } : {},
    length(local.hooks) > 0 ? { hooks = local.hooks } : {},
    var.relocation == null ? {} : {
      relocation = {
        mode            = var.relocation.mode
        "lock-table"    = var.relocation.lock_table
        "delete-source" = var.relocation.delete_source
      }
    },
  )
}

variable "cps_attach_source" {
  description = "{ url, sha256 } for user data to download and verify cps-attach, or null when it is in the image."
  type = object({
    url    = string
    sha256 = string
  })
  default = null
}

variable "cps_attach_path" {
  description = "Path of cps-attach on the node."
  type        = string
  default     = "/usr/local/bin/cps-attach"
}

variable "region" {
  description = "The AWS region, exported to cps-attach."
  type        = string
  default     = null
}

output "user_data" {
  description = "The node's user data (plain text): writes the configuration, gets cps-attach, runs it."
  value = var.region == null ? null : templatefile("${path.module}/user_data.sh.tftpl", {
    config         = yamlencode(local.config)
    cps_attach     = var.cps_attach_path
    source         = var.cps_attach_source
    region         = var.region
    config_path    = "/etc/cps/attach.yml"
    node_id        = var.node_id
    cluster        = var.cluster_name
    lifecycle_hook = var.lifecycle_hook_name
  })
}

output "yaml" {
  description = "The node's cps-attach configuration file."
  value       = yamlencode(local.config)
}
